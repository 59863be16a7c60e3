#!/usr/bin/env bash
# Build a tokentap image with buildah and push it to DESTINATION; prints the
# manifest digest (sha256:...) on stdout. Offline (FROM scratch, nothing is
# pulled) and reproducible: OCI format, file and config timestamps at 0, so
# the same input gives the same digest.
#   k8s/images/build.sh filter       <tokentap_filter.wasm> <destination>
#   k8s/images/build.sh gpu-exporter <gpu-exporter binary>  <destination>
# DESTINATION: a containers-transports name, e.g.
#   docker://ghcr.io/tokentap/tokentap-filter:0.1.0 (a registry), oci:DIR, dir:DIR
# BUILDAH_ARGS: global buildah options (default `--storage-driver vfs`, which
# needs no kernel overlay support).
set -euo pipefail
if [ $# -ne 3 ]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
what=$1
artifact=$2
destination=$3
here=$(cd "$(dirname "$0")" && pwd)
read -r -a global <<<"${BUILDAH_ARGS:---storage-driver vfs}"
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
case $what in
  filter) cp "$artifact" "$context/tokentap_filter.wasm" ;;
  gpu-exporter) "$here/stage-gpu-exporter.sh" "$artifact" "$context/rootfs" ;;
  *) echo "build.sh: unknown image $what (filter, gpu-exporter)" >&2; exit 2 ;;
esac
tag="localhost/tokentap-$what:build"
buildah "${global[@]}" bud --isolation chroot --timestamp 0 --format oci \
  -f "$here/$what.Dockerfile" -t "$tag" "$context" >&2
buildah "${global[@]}" push --format oci --digestfile "$context/digest" "$tag" "$destination" >&2
cat "$context/digest"
echo

#!/usr/bin/env bash
# Build a tokentap image with buildah and push it to DESTINATION; prints the
# manifest digest (sha256:...) on stdout. Offline (FROM scratch, nothing is
# pulled) and reproducible: OCI format, file and config timestamps at 0, so
# the same input gives the same digest.
#   k8s/images/build.sh filter       <tokentap_filter.wasm> <destination>
#   k8s/images/build.sh gpu-exporter <gpu-exporter binary>  <destination>
#   k8s/images/build.sh module       <libtokentap_module.so> <destination>
# DESTINATION: a containers-transports name, e.g.
#   docker://ghcr.io/tokentap/tokentap-filter:0.1.0 (a registry), oci:DIR, dir:DIR
# module: the library goes to /abi-vX.Y/ for the ABI filters/module/src/abi.rs
# declares (stage-module.sh: the library must carry that string and need
# nothing but glibc; readelf); a registry tag must end in -abi-vX.Y.
# BUILDAH_ARGS: global buildah options (default `--storage-driver vfs`, which
# needs no kernel overlay support).
set -euo pipefail
if [ $# -ne 3 ]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
what=$1
artifact=$2
destination=$3
here=$(cd "$(dirname "$0")" && pwd)
read -r -a global <<<"${BUILDAH_ARGS:---storage-driver vfs}"
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
build_args=()
tag="localhost/tokentap-$what:build"
case $what in
  filter) cp "$artifact" "$context/tokentap_filter.wasm" ;;
  gpu-exporter) "$here/stage-gpu-exporter.sh" "$artifact" "$context/rootfs" ;;
  module)
    staged=$("$here/stage-module.sh" "$artifact" "$context/rootfs")
    read -r abi arch <<<"$staged"
    abi_dir="abi-$(echo "$abi" | cut -d. -f1,2)"
    case $destination in
      docker://*:*"-$abi_dir" | docker://*:"$abi_dir") ;;
      docker://*) echo "build.sh: the registry tag must end in -$abi_dir: $destination" >&2; exit 2 ;;
    esac
    build_args=(--build-arg "ABI=$abi" --arch "$arch")
    tag="localhost/tokentap-$what:$abi_dir"
    ;;
  *) echo "build.sh: unknown image $what (filter, gpu-exporter, module)" >&2; exit 2 ;;
esac
buildah "${global[@]}" bud --isolation chroot --timestamp 0 --format oci "${build_args[@]}" \
  -f "$here/$what.Dockerfile" -t "$tag" "$context" >&2
buildah "${global[@]}" push --format oci --digestfile "$context/digest" "$tag" "$destination" >&2
cat "$context/digest"
echo

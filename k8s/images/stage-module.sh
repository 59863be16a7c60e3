#!/usr/bin/env bash
# Stage the module image's root filesystem in ROOTFS: the library at
# /abi-vX.Y/libtokentap_module.so (mode 0644), X.Y from the ABI version
# filters/module/src/abi.rs declares. Refuses a library that does not carry
# that ABI string (built from other sources), or that needs a library glibc
# does not provide (libgcc_s, say, which Envoy's distroless images lack; see
# filters/module/build.rs). Prints "<ABI version> <OCI architecture>",
# e.g. "v0.1.0 amd64".
#   k8s/images/stage-module.sh <libtokentap_module.so> <rootfs>
set -euo pipefail
lib=$1
root=$2
here=$(cd "$(dirname "$0")" && pwd)
abi=$(sed -n 's/^pub const ABI_VERSION: &\[u8\] = b"\(v[0-9][0-9.]*\)\\0";$/\1/p' "$here/../../filters/module/src/abi.rs")
if [ -z "$abi" ]; then
  echo "stage-module.sh: no ABI_VERSION in filters/module/src/abi.rs" >&2
  exit 1
fi
others=()
for needed in $(readelf -d "$lib" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'); do
  case $needed in
    libc.so.6 | libm.so.6 | libdl.so.2 | libpthread.so.0 | librt.so.1 | ld-linux-*.so.*) ;;  # glibc
    *) others+=("$needed") ;;
  esac
done
if [ ${#others[@]} -gt 0 ]; then
  echo "stage-module.sh: $lib needs ${others[*]}; only glibc's libraries may be needed (docs/dynamic-module.md)" >&2
  exit 1
fi
if ! LC_ALL=C grep -qaP "\Q$abi\E\x00" "$lib"; then
  echo "stage-module.sh: $lib does not carry ABI $abi (filters/module/src/abi.rs)" >&2
  exit 1
fi
case $(readelf -h "$lib" | sed -n 's/^ *Machine: *//p') in
  "Advanced Micro Devices X86-64") arch=amd64 ;;
  AArch64) arch=arm64 ;;
  *) echo "stage-module.sh: $lib: unsupported machine" >&2; exit 1 ;;
esac
dir="abi-$(echo "$abi" | cut -d. -f1,2)"
install -d -m 0755 "$root/$dir"
install -m 0644 "$lib" "$root/$dir/libtokentap_module.so"
echo "$abi $arch"

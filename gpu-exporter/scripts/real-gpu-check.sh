#!/usr/bin/env bash
# Cross-check gpu-exporter against the real NVIDIA driver on this machine.
#
# Starts the exporter (no kubelet, no API server) on 127.0.0.1, waits for two
# collection passes, then compares every exported value with nvidia-smi and,
# when importable, nvidia-ml-py (pynvml). Prints a table, writes
# real-gpu-check.md (to paste into docs/gpu-exporter.md) and exits non-zero
# when a value disagrees beyond its tolerance.
#
# Usage: gpu-exporter/scripts/real-gpu-check.sh [OUT_DIR]
# Env:   GPU_EXPORTER_BIN   use this binary instead of building one
#        PYTHON             interpreter (default python3)
#        CARGO_TARGET_DIR   where to build (default ./target)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$PWD}"
python="${PYTHON:-python3}"
mkdir -p "$out"

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "nvidia-smi not found: this check needs a machine with an NVIDIA GPU and driver" >&2
  exit 2
fi
nvidia-smi -L

bin="${GPU_EXPORTER_BIN:-}"
if [[ -z "$bin" ]]; then
  target="${CARGO_TARGET_DIR:-$repo/target}"
  (cd "$repo" && cargo build --release -p tokentap-gpu-exporter)
  bin="$target/release/gpu-exporter"
fi
[[ -x "$bin" ]] || { echo "no exporter binary at $bin" >&2; exit 2; }

port="$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
log="$out/gpu-exporter.log"
"$bin" --listen "127.0.0.1:$port" --node-name "$(hostname)" --collect-interval 1s \
  --kubelet-socket "" --kube-api-url none --host-proc /proc --runtime-disable \
  --log-format json >"$log" 2>&1 &
exporter_pid=$!
cleanup() { kill "$exporter_pid" 2>/dev/null || true; wait "$exporter_pid" 2>/dev/null || true; }
trap cleanup EXIT

for _ in $(seq 1 50); do
  if "$python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=1)" 2>/dev/null; then
    break
  fi
  kill -0 "$exporter_pid" 2>/dev/null || { echo "exporter exited:"; cat "$log"; exit 1; }
  sleep 0.2
done

status=0
"$python" "$here/real_gpu_check.py" --url "http://127.0.0.1:$port" --markdown "$out/real-gpu-check.md" || status=$?
echo "exporter log: $log"
exit "$status"

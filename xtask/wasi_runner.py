"""Cargo's runner for wasm32-wasip1 test binaries: `python wasi_runner.py
<binary.wasm> [libtest args...]` runs the binary under Wasmtime (PyPI
`wasmtime`, a prebuilt runtime with WASI preview 1) and exits with its
status, so `cargo test --target wasm32-wasip1 -p tokentap-core` runs the
core's tests compiled for the target the filter ships on.

`cargo xtask test` sets `CARGO_TARGET_WASM32_WASIP1_RUNNER` to this script.

Files: the workspace root is preopened twice, as `/` (WASI has no working
directory; wasi-libc resolves relative paths against `/`, where proptest
then finds the test's source file from `file!()`, which cargo makes relative
to the workspace, and so its `proptest-regressions/` files) and under its
own absolute path (paths the tests build from `env!("CARGO_MANIFEST_DIR")`,
such as the fuzz corpus and docs/metrics.md). Nothing outside the workspace
is visible.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from wasmtime import Config, Engine, ExitTrap, Linker, Module, Store, Trap, WasiConfig, WasmtimeError

ROOT = Path(__file__).resolve().parent.parent
#: Environment variables the tests may read (libtest, proptest, backtraces).
PASSED_ENV = ("RUST_BACKTRACE", "RUST_TEST_THREADS", "RUST_TEST_NOCAPTURE", "PROPTEST_CASES", "PROPTEST_MAX_SHRINK_ITERS")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: wasi_runner.py <binary.wasm> [args...]", file=sys.stderr)
        return 2
    wasm = argv[1]
    config = Config()
    # Compiled modules are cached (wasmtime's cache directory), so a rerun
    # of unchanged test binaries starts at once.
    try:
        config.cache = True
    except WasmtimeError:
        pass
    engine = Engine(config)
    module = Module.from_file(engine, wasm)
    linker = Linker(engine)
    linker.define_wasi()
    wasi = WasiConfig()
    wasi.argv = [Path(wasm).name, *argv[2:]]
    # A panic aborts on wasm32-wasip1 (no unwinding), so libtest never gets
    # to print a failed test's captured output: without capture, the panic
    # message is on stderr before the trap.
    env = {"RUST_TEST_NOCAPTURE": "1"}
    env.update((k, os.environ[k]) for k in PASSED_ENV if k in os.environ)
    wasi.env = list(env.items())
    wasi.inherit_stdin()
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    wasi.preopen_dir(str(ROOT), str(ROOT))
    wasi.preopen_dir(str(ROOT), "/")
    store = Store(engine)
    store.set_wasi(wasi)
    instance = linker.instantiate(store, module)
    start = instance.exports(store)["_start"]
    try:
        start(store)
    except ExitTrap as e:
        return e.code
    except Trap as e:
        # A panic (an abort here): its message is already on stderr; the
        # trap's backtrace says where.
        print(f"wasi_runner: {Path(wasm).name} trapped: {e}", file=sys.stderr)
        return 101
    return 0


if __name__ == "__main__":
    sys.stdout.flush()
    sys.exit(main(sys.argv))

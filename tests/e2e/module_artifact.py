"""The dynamic module as an artifact: its ABI and what it needs at load.

* `abi_version()`: the ABI string the library reports to Envoy, read from
  filters/module/src/abi.rs (`ABI_VERSION`); `abi_folder()` its
  `abi-vX.Y` folder name (k8s/images/stage-module.sh, the packages' paths).
* `elf_*`: dynamic-section facts read with binutils' `readelf` (the test is
  skipped without it): NEEDED libraries, RPATH/RUNPATH, undefined dynamic
  symbols, the glibc symbol versions required.
* `documented_runtime()`: the same facts as docs/dynamic-module.md states
  them, so a test can hold the docs to the built library.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from harness import REPO
from ops_stack import system_tool

ABI_RS = REPO / "filters" / "module" / "src" / "abi.rs"
DOC = REPO / "docs" / "dynamic-module.md"
#: Where the shipped packages publish the library image.
MODULE_IMAGE = "ghcr.io/tokentap/tokentap-module"


def abi_version() -> str:
    (version,) = re.findall(r'^pub const ABI_VERSION: &\[u8\] = b"(v[0-9.]+)\\0";$', ABI_RS.read_text(), re.M)
    return version


def abi_folder() -> str:
    return "abi-" + ".".join(abi_version().split(".")[:2])


def _readelf(*args: str) -> str:
    result = subprocess.run([str(system_tool("readelf")), "-W", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def elf_needed(path: Path) -> list[str]:
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _readelf("-d", str(path)))


def elf_search_paths(path: Path) -> list[str]:
    """RPATH and RUNPATH entries."""
    return re.findall(r"\((?:RPATH|RUNPATH)\)\s+Library (?:rpath|runpath): \[([^\]]*)\]", _readelf("-d", str(path)))


def _dynamic_symbols(path: Path) -> list[tuple[str, bool]]:
    """(name, defined) of every dynamic symbol."""
    out = []
    for line in _readelf("--dyn-syms", str(path)).splitlines():
        cols = line.split()
        # Num: Value Size Type Bind Vis Ndx Name
        if len(cols) >= 8 and cols[0].endswith(":") and cols[0][:-1].isdigit():
            out.append((cols[7].split("@")[0], cols[6] != "UND"))
    return out


def elf_undefined_symbols(path: Path) -> set[str]:
    """Names of the undefined dynamic symbols (what the loader must find)."""
    return {name for name, defined in _dynamic_symbols(path) if not defined}


def elf_defined_symbols(path: Path) -> set[str]:
    """Names of the dynamic symbols `path` exports."""
    return {name for name, defined in _dynamic_symbols(path) if defined}


def elf_glibc_versions(path: Path) -> list[tuple[int, ...]]:
    """The GLIBC_x.y versions the library's version-needs section names."""
    found = set(re.findall(r"Name: GLIBC_([0-9.]+)", _readelf("-V", str(path))))
    return sorted(tuple(int(p) for p in v.split(".")) for v in found)


def elf_machine(path: Path) -> str:
    (machine,) = re.findall(r"^\s*Machine:\s*(.+?)\s*$", _readelf("-h", str(path)), re.M)
    return machine


def documented_runtime() -> dict[str, list[str]]:
    """The rows of docs/dynamic-module.md's runtime table: `ELF NEEDED` and
    `Newest glibc symbol version`, each as its backticked values."""
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| (ELF `NEEDED`|Newest glibc symbol version) \|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = re.findall(r"`([^`]+)`", m.group(2))
    return rows

"""Build the compiled VNIC data path and VSIC request check with cffi's API mode: ``python -m vdev.fast.build``.

``--sanitize`` builds a second module, ``_vfast_asan``, with AddressSanitizer and
UndefinedBehaviorSanitizer (loaded only when ARRAKIS_VDEV_FAST=asan, under LD_PRELOAD of
libasan; see tests/test_devfast_diff.py). Warnings are errors in both.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import cffi  # type: ignore[import-untyped]  # no stubs published for cffi

HERE = Path(__file__).resolve().parent
COMMON_FLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"]
# The VNIC data path and the VSIC request check share one module (and its sanitized twin).
HEADERS = ["vfast.h", "vsic.h"]
SOURCES = ["vfast.c", "vsic.c"]
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]


def _cdef() -> str:
    # cffi parses the headers themselves: one declaration of the ABI between C and Python.
    return "".join((HERE / name).read_text() for name in HEADERS)


def builder(sanitize: bool) -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(_cdef())
    flags = COMMON_FLAGS + (SANITIZE_FLAGS if sanitize else [])
    ffi.set_source(
        "vdev.fast._vfast_asan" if sanitize else "vdev.fast._vfast",
        "#include <stdint.h>\n" + "".join(f'#include "{name}"\n' for name in HEADERS),
        sources=[str(HERE / name) for name in SOURCES],
        include_dirs=[str(HERE)],
        extra_compile_args=flags,
        extra_link_args=SANITIZE_FLAGS if sanitize else [],
    )
    return ffi


def main(argv: list[str]) -> int:
    sanitize = "--sanitize" in argv
    # Intermediate files (generated C, objects) go to a scratch folder; only the module
    # lands in the package.
    scratch = Path(tempfile.mkdtemp(prefix="vfast-build-"))
    try:
        built = Path(builder(sanitize).compile(tmpdir=str(scratch), verbose=False))
        shutil.copy2(built, HERE / built.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Build the compiled libOS fast path with cffi's API mode.

    python -m libos.fast.build             # libos/fast/_arx_fast*.so (what the libOS loads)
    python -m libos.fast.build --sanitize  # libos/fast/_arx_fast_san*.so, ASan + UBSan

The set-up (``tools/run setup``) runs the first; it is idempotent because the extension is
rebuilt only when a source is newer than it. Warnings are errors: this C runs inside the
application, on bytes that came off the wire.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cffi import FFI  # type: ignore[import-untyped]

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "arx_fast.c",)
HEADER = HERE / "arx_fast.h"
MODULE = "_arx_fast"
SAN_MODULE = "_arx_fast_san"
BASE_FLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-std=c11", "-fno-strict-aliasing"]
SAN_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]


def _cdef() -> str:
    """The header without preprocessor lines: cffi's cdef parses declarations only."""
    lines = []
    for line in HEADER.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            if stripped.startswith("#define ARX_"):
                # Integer constants go to Python as lib.ARX_*; the include guard does not.
                parts = stripped.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    lines.append(f"#define {parts[1]} {parts[2]}")
            continue
        lines.append(line)
    return "\n".join(lines)


def make_ffi(sanitize: bool) -> FFI:
    ffi = FFI()
    ffi.cdef(_cdef())
    flags = BASE_FLAGS + (SAN_FLAGS if sanitize else [])
    ffi.set_source(
        f"libos.fast.{SAN_MODULE if sanitize else MODULE}",
        '#include "arx_fast.h"',
        sources=[str(path) for path in SOURCES],
        include_dirs=[str(HERE)],
        extra_compile_args=flags,
        extra_link_args=SAN_FLAGS if sanitize else [],
    )
    return ffi


def _built(module: str) -> Path | None:
    found = sorted(HERE.glob(f"{module}.*.so")) + sorted(HERE.glob(f"{module}.so"))
    return found[0] if found else None


def build(sanitize: bool = False, force: bool = False) -> Path:
    module = SAN_MODULE if sanitize else MODULE
    existing = _built(module)
    inputs = [*SOURCES, HEADER, Path(__file__)]
    if existing is not None and not force:
        if existing.stat().st_mtime >= max(path.stat().st_mtime for path in inputs):
            return existing
    ffi = make_ffi(sanitize)
    # Compile in a scratch directory under build/ (gitignored) so the tree holds only the .so.
    tmpdir = HERE.parent.parent / "build" / ("arx_fast_san" if sanitize else "arx_fast")
    tmpdir.mkdir(parents=True, exist_ok=True)
    so_path = Path(ffi.compile(tmpdir=str(tmpdir), verbose=False))
    target = HERE / so_path.name
    os.replace(so_path, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sanitize", action="store_true", help="ASan + UBSan build (_arx_fast_san)")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    path = build(sanitize=args.sanitize, force=args.force)
    print(f"libos.fast: {path.relative_to(HERE.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

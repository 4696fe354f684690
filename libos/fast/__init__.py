"""The compiled libOS fast path (C through cffi's API mode), and the switch to turn it off.

``ARRAKIS_PURE=1`` in the environment selects the pure-Python path everywhere; it is the
reference the C is tested against. Otherwise the compiled module must be there (the
set-up, ``tools/run setup``, builds it with ``python -m libos.fast.build``): a missing
module is an error at import, never a silent fall back to the slow path.
``ARRAKIS_FAST_SANITIZE=1`` loads the AddressSanitizer/UBSan build instead
(``python -m libos.fast.build --sanitize``; the interpreter must then run with the ASan
runtime preloaded, ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)``).

``ARRAKIS_TCP_PREDICT=0`` keeps the compiled RX burst and segment writer but turns TCP
header prediction off (connections then keep their state in Python, as on the pure path).

``lib`` and ``ffi`` are None on the pure path; callers test ``ENABLED``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Final

PURE: Final = os.environ.get("ARRAKIS_PURE", "") not in ("", "0")
SANITIZE: Final = os.environ.get("ARRAKIS_FAST_SANITIZE", "") not in ("", "0")
TCP_PREDICT: Final = os.environ.get("ARRAKIS_TCP_PREDICT", "1") not in ("", "0")


class FastPathMissing(ImportError):
    """The compiled module is not built and the pure path was not asked for."""


def compiled() -> tuple[Any, Any]:
    """The compiled module's ``(ffi, lib)``, whatever ARRAKIS_PURE says.

    For the differential tests and benchmarks, which run the pure path and the compiled one
    side by side in one process; the libOS itself goes by ``ENABLED``.
    """
    name = "libos.fast._arx_fast_san" if SANITIZE else "libos.fast._arx_fast"
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        flag = " --sanitize" if SANITIZE else ""
        raise FastPathMissing(
            f"the compiled libOS fast path ({name}) is not built: run `bash tools/run setup` "
            f"or `python -m libos.fast.build{flag}`, or set ARRAKIS_PURE=1 for the pure-Python path"
        ) from exc
    return module.ffi, module.lib


def _load() -> tuple[Any, Any]:
    if PURE:
        return None, None
    return compiled()


ffi, lib = _load()
ENABLED: Final = lib is not None

KIND_OTHER: Final = 0
KIND_TCP: Final = 1
KIND_UDP: Final = 2
KIND_BAD_CSUM: Final = 3

"""The VNIC device's compiled data path (issue 11, item 2): C through cffi's API mode.

The Python model in ``vdev.vnic`` stays the reference and the owner of all configuration:
the filter table, the DMA tables, the rate limiters and the counters. Before each burst the
Python side (``mirror.FastPath``) mirrors what the burst needs into C structures; C does the
fast cases only (an exact receive filter hit delivered into a posted buffer; a transmitted
IPv4 TCP/UDP frame from the function's own MAC that an exact transmit filter allows) and
hands every other frame or descriptor back to the Python model, in order. What C counted is
added into the Python counters at the end of the burst, so snapshots see one set of numbers.

Wire I/O: on a tap, C drains a burst of frames with a loop of read(2) until EAGAIN in one
call (``vf_read_burst``) and writes a TX burst with a loop of write(2). A tap fd is not a
socket, so recvmmsg/sendmmsg do not apply; io_uring would batch the system calls themselves
but liburing is not installed here (Debian's liburing-dev 2.3 is available); AF_PACKET with
PACKET_MMAP would remove them on receive but is a new backend. Measured on this 2-core VM
(loaded by other work), draining 32-frame bursts from a tap: 1.56 us per frame with the
Python loop (``TapBackend.receive``), 0.96 us with ``vf_read_burst``; the system call is
most of what remains, which is where an io_uring or PACKET_MMAP backend would go next.

The same module holds the VSIC's request check and translation (``vsic.c``, mirrored by
``vsic_mirror.py``): C decides and translates a batch of requests, the Python model in
``vdev.vsic.function`` still does the I/O and completions.

Selection: ``ARRAKIS_PURE=1`` keeps the pure-Python path; ``ARRAKIS_VDEV_FAST=asan`` loads the
AddressSanitizer/UBSan build (the process must preload libasan). Build with
``python -m vdev.fast.build`` (``--sanitize`` for the second module).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


class FastUnavailable(Exception):
    """The compiled module is not built (run ``python -m vdev.fast.build``)."""


def pure_requested() -> bool:
    return os.environ.get("ARRAKIS_PURE", "") not in ("", "0")


def load_module() -> ModuleType:
    """The compiled cffi module (``ffi`` and ``lib``), as selected by the environment."""
    name = "vdev.fast._vfast_asan" if os.environ.get("ARRAKIS_VDEV_FAST") == "asan" else "vdev.fast._vfast"
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise FastUnavailable(f"{name} is not built: {exc}") from None

"""Raising an interrupt on an eventfd the application owns, without ever blocking.

A driver hands the device its interrupt eventfds with SET_IRQS (SCM_RIGHTS), so the device
host holds the *same open file description* as the application. ``O_NONBLOCK`` lives in that
description: an application can clear it (``fcntl(F_SETFL)``) and fill the counter to its
maximum, after which a ``write(2)`` of 1 sleeps until somebody reads, which the application
never does. The device host would hang forever, with every function of every application.
Neither a re-open (``/proc/self/fd/N`` of an anon inode fails with ENXIO) nor a flag check
before the write (the application can flip the flag in between) avoids that.

The kernel has one way to signal an eventfd that never blocks, the one KVM's irqfd and the
in-kernel VFIO drivers use: ``eventfd_signal()``, which saturates the counter instead of
waiting. User space reaches it through Linux AIO: an AIO request submitted with
``IOCB_FLAG_RESFD`` signals the given eventfd that way when it completes. ``EventfdSignaller``
submits a zero-byte read of a private memfd (it completes inside ``io_submit``) with the
application's eventfd as ``aio_resfd``; the completions are reaped in batches. Whatever the
application does to its eventfd (blocking mode, a full counter, never reading), the device
host's signal returns at once.

The AIO context is process-wide, created on first use and reused (a device host is single
threaded). Where the kernel has no AIO, ``EventfdSignaller`` raises ``OSError`` and SET_IRQS
is refused: a blocking fallback would bring the hang back.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from typing import Final

# Syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl; asm-generic/unistd.h for arm64).
_SYSCALLS: Final = {
    "x86_64": {"io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209},
    "aarch64": {"io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_getevents": 4},
}
_IOCB_CMD_PREAD: Final = 0  # linux/aio_abi.h
_IOCB_FLAG_RESFD: Final = 1 << 0
# Completions the kernel may hold before we reap them; reaping every half of it costs one
# io_getevents per REAP_EVERY signals.
AIO_EVENTS: Final = 256
REAP_EVERY: Final = AIO_EVENTS // 2


class _Iocb(ctypes.Structure):
    # struct iocb of linux/aio_abi.h (little-endian layout: aio_key before aio_rw_flags).
    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _IoEvent(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class EventfdSignaller:
    """Adds 1 to eventfds through the kernel's non-blocking ``eventfd_signal``."""

    def __init__(self) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None:
            raise OSError(errno.ENOSYS, f"no AIO syscall table for {platform.machine()}")
        self._nr = numbers
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = self._libc.syscall
        self._syscall.restype = ctypes.c_long
        self._ctx = ctypes.c_ulong(0)
        if self._syscall(numbers["io_setup"], AIO_EVENTS, ctypes.byref(self._ctx)) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"Linux AIO unavailable (io_setup: {os.strerror(code)})")
        # The read that carries the signal: zero bytes of a private, empty memfd, which
        # completes synchronously inside io_submit.
        self._source = os.memfd_create("vdev-irq-source", os.MFD_CLOEXEC)
        self._buffer = ctypes.create_string_buffer(1)
        self._iocb = _Iocb(
            aio_lio_opcode=_IOCB_CMD_PREAD,
            aio_fildes=self._source,
            aio_buf=ctypes.addressof(self._buffer),
            aio_nbytes=0,
            aio_flags=_IOCB_FLAG_RESFD,
        )
        self._iocbs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(self._iocb))
        self._events = (_IoEvent * AIO_EVENTS)()
        self._no_wait = (ctypes.c_long * 2)(0, 0)  # struct timespec {0, 0}: never wait
        self._outstanding = 0
        self.closed = False

    def signal(self, fd: int) -> bool:
        """Add 1 to eventfd ``fd`` (saturating, never blocking). False if the kernel refused
        (``fd`` is not an eventfd, or no AIO slot was free even after reaping)."""
        if self.closed:
            return False
        if self._outstanding >= REAP_EVERY:
            self._reap()
        self._iocb.aio_resfd = fd
        for _attempt in range(2):
            if self._syscall(self._nr["io_submit"], self._ctx, 1, self._iocbs) == 1:
                self._outstanding += 1
                return True
            if ctypes.get_errno() != errno.EAGAIN:
                return False
            self._reap()  # the completion ring is full: make room once
        return False

    def _reap(self) -> None:
        got = self._syscall(self._nr["io_getevents"], self._ctx, 0, AIO_EVENTS, self._events, self._no_wait)
        if got > 0:
            self._outstanding = max(0, self._outstanding - got)
        elif got == 0:
            self._outstanding = 0  # nothing was left to reap

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._syscall(self._nr["io_destroy"], self._ctx)
        os.close(self._source)


_shared: EventfdSignaller | None = None


def shared_signaller() -> EventfdSignaller:
    """The process's signaller, created on first use; raises ``OSError`` without AIO."""
    global _shared
    if _shared is None or _shared.closed:
        _shared = EventfdSignaller()
    return _shared

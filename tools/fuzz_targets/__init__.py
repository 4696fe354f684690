"""Fuzz targets: one in-process harness per trust boundary, each with a stated contract.

A target is a function ``one_input(data: bytes) -> None``. It feeds ``data`` to the code
under test and returns normally when the code either accepted the input or refused it
in one of the documented ways (the target's ``clean`` exceptions, caught inside the
harness). Anything else that escapes is a finding: an exception the code should never
raise on hostile input, or a ``ContractViolation`` raised by the harness's own oracle
(a value used that was never validated, garbage returned by a recovery, and so on).

This module only names the targets; the harness modules are imported on demand, so that
the fuzzing driver can import them under atheris's coverage instrumentation.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parent.parent.parent
CORPUS_ROOT = REPO / "tests" / "fuzz_corpus"


class ContractViolation(AssertionError):
    """The harness's oracle saw the code under test break its contract."""


@dataclass(frozen=True)
class Target:
    name: str
    module: str  # tools.fuzz_targets.<module> defines one_input and seeds
    covers: tuple[str, ...]  # the modules whose coverage counts (instrumented, measured)
    contract: str  # what counts as a clean rejection

    def load(self) -> tuple[Callable[[bytes], None], Callable[[], list[bytes]]]:
        module = importlib.import_module(f"tools.fuzz_targets.{self.module}")
        harness = getattr(module, f"one_input_{self.name}")
        seeds = getattr(module, f"seeds_{self.name}")
        return harness, seeds

    @property
    def corpus_dir(self) -> Path:
        return CORPUS_ROOT / self.name


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "vfio_wire",
            "vfio",
            ("vdev.vfio_user.wire",),
            "MessageReader.feed raises only ProtocolError; decoders raise only VfioError; "
            "every message handed out is whole and within max_msg_size; encode/decode round-trips",
        ),
        Target(
            "vfio_server",
            "vfio",
            ("vdev.vfio_user.server", "vdev.vfio_user.wire", "vdev.function_base", "vdev.dma"),
            "ServerSession.handle raises only VfioError/ProtocolError, driven with a real VNIC "
            "function; the socket adapter never raises and never leaks an fd",
        ),
        Target(
            "vnic_double_fetch",
            "devices",
            ("vdev.vnic.function", "vdev.ring", "vdev.function_base", "vdev.dma"),
            "the VNIC's TX/RX path never raises while the driver rewrites descriptors, registers "
            "and buffers between the device's reads; every action matches the fetched copy",
        ),
        Target(
            "vsic_double_fetch",
            "devices",
            ("vdev.vsic.function", "vdev.ring", "vdev.function_base", "vdev.dma"),
            "the VSIC's request path never raises while the driver rewrites descriptors, "
            "registers and buffers between the device's reads; every I/O stays inside the VSA "
            "and matches the fetched copy",
        ),
        Target(
            "mgmt_decode",
            "mgmt",
            ("vdev.mgmt",),
            "the management decoder returns a dict or raises MgmtError, for any bytes and any "
            "JSON document (deep nesting included), and closes the fds of a refused message",
        ),
        Target(
            "packets",
            "packets",
            (
                "vdev.wire.ethernet",
                "vdev.wire.arp",
                "vdev.wire.ipv4",
                "vdev.wire.icmp",
                "vdev.wire.udp",
                "vdev.wire.tcp",
                "vdev.wire.checksum",
                "vdev.vnic.default_function",
            ),
            "parsers raise only WireError; a parsed packet re-emits to a packet that parses to "
            "the same fields; the checksum equals a word-by-word reference; the default "
            "function never raises and only answers with well-formed frames",
        ),
        Target(
            "resp",
            "apps",
            ("libos.apps.kv.resp",),
            "RequestParser raises only ProtocolError/QueryBufferLimitError whatever the "
            "chunking; the result does not depend on how the bytes were chunked",
        ),
        Target(
            "memcache",
            "apps",
            ("libos.apps.memcache.protocol", "libos.apps.memcache.udp", "libos.apps.memcache.store"),
            "McSession.feed and McUdpHandler.handle_datagram never raise; the output does not "
            "depend on how the bytes were chunked; UDP replies are well-framed",
        ),
        Target(
            "openflow",
            "openflow",
            (
                "kernelctl.openflow.wire",
                "kernelctl.openflow.oxm",
                "kernelctl.openflow.actions",
                "kernelctl.openflow.messages",
                "kernelctl.openflow.connection",
                "kernelctl.openflow.switch",
            ),
            "OpenFlowConnection.receive_data and Switch.handle never raise, cut the stream "
            "anyhow; input held stays under one message; the control plane's flows survive "
            "and the device's flows are exactly the switch's",
        ),
        Target(
            "log_recovery",
            "log",
            ("libos.storage.log",),
            "opening a damaged or random log image raises only LogCorruption (or LogError for "
            "an exhausted epoch); a log that opens holds exactly a prefix of the acknowledged "
            "records, byte for byte, and accepts new appends",
        ),
    )
}


def crash_signature(exc: BaseException, tb: TracebackType | None = None) -> str:
    """``Type@file:function`` of the innermost frame in the project's code: duplicates of one
    bug share it, whatever the input."""
    frames = traceback.extract_tb(tb if tb is not None else exc.__traceback__)
    site = "?"
    for frame in frames:
        path = frame.filename.replace("\\", "/")
        for package in ("/vdev/", "/libos/", "/kernelctl/"):
            if package in path:
                site = path[path.rindex(package) + 1 :] + ":" + frame.name
    if isinstance(exc, ContractViolation) and frames:
        # The harness's own oracle: each check is its own finding, named by its message
        # without the values (line numbers would change with every edit of the harness).
        headline = str(exc).split(": ", 1)[0]
        words = [word for word in headline.split() if not any(c.isdigit() for c in word)]
        return f"ContractViolation@{frames[-1].name}: {' '.join(words)[:100]}"
    elif site == "?" and frames:
        last = frames[-1]
        site = Path(last.filename).name + ":" + last.name
    return f"{type(exc).__name__}@{site}"

"""The typed control and management protocol: every message, its checks and its framing.

Two channels speak it, both ``AF_UNIX`` ``SOCK_SEQPACKET`` sockets:

* **control**: an application (the libOS) or the ``kernelctl`` CLI and the kernelctl daemon.
  The caller is untrusted; the daemon identifies it with ``SO_PEERCRED``.
* **management**: kernelctl and one device host (VNIC or VSIC). Both ends are trusted, but
  each still checks what it receives, so a bug on one side is a clear error, not a crash.

Every message is a JSON object. A request is ``{"id": n, "op": "...", fields...}`` and each
``op`` has one record class here (a frozen dataclass) whose fields say the type, range and
size of each value. A reply is ``{"id": n, "ok": true, "result": ...}`` or
``{"id": n, "ok": false, "error": "why"}``; a device host also sends events
(``{"event": "function_closed", "function_id": n}``). A ``Protocol`` is the table from op to
record for one channel; the daemon and the hosts look their handlers up by record class.
Fields that a record does not know are ignored (they still count against the size and depth
bounds), so an older peer's extra field is not an error.

Framing. A message that fits one datagram is sent as it is (the datagram starts with ``{``).
A longer one is cut into parts of at most ``CHUNK`` bytes, each datagram being one header
byte (``PART_MORE``: more parts follow, ``PART_LAST``: the last one) and the part. File
descriptors (SCM_RIGHTS) ride on the first datagram of their message only. So replies of any
size (the stats of many functions, a long VSA list) arrive whole, up to ``MAX_MESSAGE``.

Checks happen in this order, before anything else sees the message: the size of each
datagram and of the whole message, the framing, the JSON nesting depth (counted on the raw
bytes, before the JSON decoder runs, so a deeply nested array can never reach Python's
recursion limit), the JSON syntax, the envelope (``id``, ``op``), then every field of the
record. Any failure is a ``ProtocolError`` whose text goes back to the peer.

Bounds (the values below are the ones enforced):

=============================  =======  ===================================================
``CHUNK``                       32 KiB   payload bytes per datagram (below the default
                                         AF_UNIX send buffer, so one part never EMSGSIZEs)
``MAX_MESSAGE``                 16 MiB   bytes of one message, all its parts together
``MAX_REQUEST``                 512 KiB  bytes of one request (the largest real one, a VSIC
                                         create_function with 4096 extents, is ~200 KiB);
                                         a receiver discards the parts past it unbuffered
``MAX_DEPTH``                   32       JSON nesting depth of one message
``MAX_FDS``                     4        file descriptors with one message
``MAX_NAME``                    64       characters of a function or VSA name
``MAX_FILTERS``                 64       filters (port claims) per function
``MAX_RATE_BPS``                100 G    bits per second of a rate limit
``MAX_IOPS``                    10**9    requests per second of a storage limit
``MAX_VSA_BYTES``               1 TiB    size of one VSA
``MAX_EXTENTS``                 4096     extents of one storage function
``MAX_QUEUES``                  64       queues of one function
``MAX_PATH``                    1024     characters of a name in the name tree
``MAX_NAMES_PER_REQUEST``       512      names one name_serve / name_publish makes
``MAX_OUTPUT``                  32 MiB   bytes a ``Channel`` holds for a peer that does not
                                         read (the daemon also holds at most one reply per
                                         caller: see kernelctl.daemon)
=============================  =======  ===================================================
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import select
import socket
import time
import typing
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

CHUNK = 32 * 1024
MAX_MESSAGE = 16 << 20
MAX_REQUEST = 512 << 10
MAX_DEPTH = 32
MAX_FDS = 4
MAX_NAME = 64
MAX_FILTERS = 64
MAX_RATE_BPS = 100 * 10**9
MAX_IOPS = 10**9
MAX_VSA_BYTES = 1 << 40
MAX_EXTENTS = 4096
MAX_QUEUES = 64
MAX_OUTPUT = 32 << 20
MAX_PATH = 1024
MAX_NAMES_PER_REQUEST = 512
MAX_ID = (1 << 53) - 1  # what every JSON implementation holds exactly
U32 = 0xFFFFFFFF
U64 = 0xFFFFFFFFFFFFFFFF
PROTOCOLS = ("udp", "tcp")

PART_MORE = 0x01
PART_LAST = 0x02
_WHOLE = ord("{")


class ProtocolError(ValueError):
    """A message that cannot be read or does not follow the protocol; the text says why."""


# ---- JSON with bounds ----------------------------------------------------------------------

# A JSON string (escapes included); replaced by "" before counting brackets, so a bracket
# inside a string does not count.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def check_depth(data: bytes, limit: int = MAX_DEPTH) -> None:
    """Refuse JSON text nested deeper than ``limit`` without parsing it.

    Each pass removes every innermost ``[]``/``{}`` pair (after strings and scalars are
    gone), so a text of depth d is empty after d passes; each pass is one regex sweep in C.
    """
    brackets = _STRING.sub(b'""', data).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return
        shorter = _INNERMOST.sub(b"", brackets)
        if len(shorter) == len(brackets):
            raise ProtocolError("unbalanced brackets")
        brackets = shorter
    if brackets:
        raise ProtocolError(f"JSON nested deeper than {limit} levels")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN and Infinity


def decode_json(data: bytes) -> dict[str, Any]:
    """One message's JSON object, after the size and depth checks."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes (at most {MAX_MESSAGE})")
    check_depth(data)
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError cannot happen after check_depth
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError("a message is a JSON object")
    return value


def encode_json(message: dict[str, Any]) -> bytes:
    try:
        data = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"cannot encode the message: {exc}") from None
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes (at most {MAX_MESSAGE})")
    return data


# ---- framing ---------------------------------------------------------------------------------


def frames(payload: bytes) -> list[bytes]:
    """The datagrams that carry ``payload``: itself when it fits one, else headed parts."""
    if len(payload) <= CHUNK and payload[:1] == b"{":
        return [payload]
    parts = [payload[i : i + CHUNK] for i in range(0, len(payload), CHUNK)] or [b""]
    return [bytes([PART_MORE]) + part for part in parts[:-1]] + [bytes([PART_LAST]) + parts[-1]]


class Reassembler:
    """Puts the parts of one message back together, within ``limit`` bytes.

    ``feed`` takes one datagram and returns the whole message once its last part came, or
    None while more must come. A bad frame or a message over the limit raises
    ``ProtocolError`` when that message ends (its remaining parts are discarded, not kept),
    so the stream stays in step and the next message is read normally.
    """

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._error = ""

    @property
    def in_message(self) -> bool:
        return bool(self._parts) or bool(self._error)

    def feed(self, datagram: bytes, truncated: bool = False) -> bytes | None:
        head = datagram[0] if datagram else -1
        if head == _WHOLE and not self.in_message:
            if truncated:
                raise ProtocolError(f"datagram larger than {CHUNK} bytes")
            return datagram
        if head not in (PART_MORE, PART_LAST):
            self._reset()
            raise ProtocolError("not a message: a datagram starts with '{' or a part header")
        if truncated:
            self._error = self._error or f"datagram larger than {CHUNK + 1} bytes"
        elif not self._error:
            self._size += len(datagram) - 1
            if self._size > self.limit:
                self._error = f"message larger than {self.limit} bytes"
                self._parts.clear()
            else:
                self._parts.append(datagram[1:])
        if head == PART_MORE:
            return None
        error = self._error
        payload = b"".join(self._parts)
        self._reset()
        if error:
            raise ProtocolError(error)
        return payload

    def _reset(self) -> None:
        self._parts = []
        self._size = 0
        self._error = ""


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class ChannelFull(Exception):
    """The peer did not read and the channel's output buffer reached its bound."""


@dataclass
class Incoming:
    """One message read from a channel: its payload or why it was refused, and its fds."""

    payload: bytes | None
    fds: list[int]
    error: str = ""


class Channel:
    """One ``SOCK_SEQPACKET`` endpoint, non-blocking, with an inbox and a bounded outbox.

    ``send`` queues a message's datagrams (with private copies of its fds) and ``flush``
    writes as many as the socket takes without blocking; the owner watches for writability
    while ``pending`` is true. Queuing past ``max_output`` bytes raises ``ChannelFull``.
    ``stalled_since`` is when the outbox last went from empty to non-empty, for a deadline.
    """

    def __init__(self, sock: socket.socket, max_input: int = MAX_MESSAGE, max_output: int = MAX_OUTPUT) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.max_output = max_output
        self.closed = False
        self.stalled_since = 0.0
        self._inbox = Reassembler(max_input)
        self._fds: list[int] = []
        self._fd_error = ""
        self._out: deque[tuple[bytes, list[int]]] = deque()
        self._out_bytes = 0
        self.messages_out = 0  # whole messages not yet written out

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def pending(self) -> bool:
        return bool(self._out)

    @property
    def pending_bytes(self) -> int:
        return self._out_bytes

    # ---- input -----------------------------------------------------------------------------

    def receive(self, max_messages: int = 16, max_datagrams: int = 1024) -> list[Incoming]:
        """The messages that are complete now (at most ``max_messages``, reading at most
        ``max_datagrams``: a peer that sends without pause cannot hold the reader here);
        sets ``closed`` at EOF."""
        messages: list[Incoming] = []
        for _ in range(max_datagrams):
            if len(messages) >= max_messages or self.closed:
                break
            try:
                data, fds, flags, _addr = socket.recv_fds(self.sock, CHUNK + 1, MAX_FDS, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.closed = True
                break
            if not data and not fds:
                self.closed = True
                break
            if self._inbox.in_message and fds:
                self._fd_error = "file descriptors after the first part of a message"
            self._fds += fds
            if flags & socket.MSG_CTRUNC:
                self._fd_error = f"more than {MAX_FDS} file descriptors"
            try:
                payload = self._inbox.feed(data, bool(flags & socket.MSG_TRUNC))
            except ProtocolError as exc:
                messages.append(self._take(None, str(exc)))
                continue
            if payload is not None:
                messages.append(self._take(payload, ""))
        return messages

    def _take(self, payload: bytes | None, error: str) -> Incoming:
        fds, self._fds = self._fds, []
        error = error or self._fd_error
        self._fd_error = ""
        if error:
            close_fds(fds)
            return Incoming(None, [], error)
        return Incoming(payload, fds)

    # ---- output ----------------------------------------------------------------------------

    def send(self, payload: bytes, fds: Iterable[int] = ()) -> None:
        datagrams = frames(payload)
        size = sum(len(d) for d in datagrams)
        if self._out_bytes + size > self.max_output:
            raise ChannelFull(f"peer holds {self._out_bytes} unread bytes (at most {self.max_output})")
        copies = [os.dup(fd) for fd in fds]  # ours until sent: the caller may close its own
        if not self._out:
            self.stalled_since = time.monotonic()
        self._out.append((datagrams[0], copies))
        for datagram in datagrams[1:]:
            self._out.append((datagram, []))
        self._out_bytes += size
        self.messages_out += 1

    def flush(self) -> bool:
        """Write what the socket takes now; True when nothing is left. OSError: peer gone."""
        while self._out:
            datagram, fds = self._out[0]
            try:
                if fds:
                    socket.send_fds(self.sock, [datagram], fds, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                else:
                    self.sock.send(datagram, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return False
            self._out.popleft()
            close_fds(fds)
            self._out_bytes -= len(datagram)
            if datagram[:1] != bytes([PART_MORE]):
                self.messages_out -= 1
            self.stalled_since = time.monotonic()  # progress: the deadline starts again
        return True

    def close(self) -> None:
        for _datagram, fds in self._out:
            close_fds(fds)
        self._out.clear()
        self._out_bytes = 0
        close_fds(self._fds)
        self._fds = []
        self.sock.close()


# ---- blocking helpers (a client, a test rig) -----------------------------------------------


def send_blocking(sock: socket.socket, payload: bytes, fds: Iterable[int] = ()) -> None:
    """Send one message on a blocking socket (its timeout applies to each datagram)."""
    fd_list = list(fds)
    for number, datagram in enumerate(frames(payload)):
        if number == 0 and fd_list:
            socket.send_fds(sock, [datagram], fd_list)
        else:
            sock.send(datagram)


def recv_blocking(sock: socket.socket, timeout: float | None = None) -> tuple[bytes, list[int]] | None:
    """One whole message and its fds; None at EOF. A socket without a timeout of its own
    waits up to ``timeout`` (None: forever) for each part after the first."""
    inbox = Reassembler()
    fds: list[int] = []
    fd_error = ""
    try:
        while True:
            if inbox.in_message and sock.gettimeout() == 0.0:
                if not select.select([sock], [], [], 5.0 if timeout is None else timeout)[0]:
                    raise ProtocolError("the rest of a message did not come")
            data, new_fds, flags, _addr = socket.recv_fds(sock, CHUNK + 1, MAX_FDS)
            if not data and not new_fds:
                if inbox.in_message:
                    raise ProtocolError("the channel closed in the middle of a message")
                close_fds(fds)
                return None
            if inbox.in_message and new_fds:
                fd_error = "file descriptors after the first part of a message"
            if flags & socket.MSG_CTRUNC:
                fd_error = f"more than {MAX_FDS} file descriptors"
            fds += new_fds
            payload = inbox.feed(data, bool(flags & socket.MSG_TRUNC))
            if payload is not None:
                if fd_error:
                    raise ProtocolError(fd_error)
                return payload, fds
    except BaseException:
        close_fds(fds)
        raise


# ---- records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """The checks of one field: integer range, string or list length, allowed strings."""

    low: int = 0
    high: int = U32
    min_len: int = 0
    max_len: int = MAX_NAME
    choices: tuple[str, ...] = ()


def bounded(default: Any = dataclasses.MISSING, **checks: Any) -> Any:
    """A record field with its checks (see ``Bound``)."""
    if default is dataclasses.MISSING:
        return field(metadata={"bound": Bound(**checks)})
    return field(default=default, metadata={"bound": Bound(**checks)})


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


def check_value(value: Any, hint: Any, bound: Bound, where: str) -> Any:
    """``value`` checked against the type ``hint`` and ``bound``; returns it normalized
    (JSON arrays become tuples, nested objects become records; a list field is
    ``tuple[X, ...]``, a fixed-length array ``tuple[X, Y]``)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"{where} must be true or false, got {_show(value)}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool) or not bound.low <= value <= bound.high:
            raise ProtocolError(f"{where} must be an integer in [{bound.low}, {bound.high}], got {_show(value)}")
        return value
    if hint is str:
        if not isinstance(value, str) or not bound.min_len <= len(value) <= bound.max_len:
            raise ProtocolError(f"{where} must be a string of {bound.min_len}..{bound.max_len} characters, got {_show(value)}")
        if bound.choices and value not in bound.choices:
            raise ProtocolError(f"{where} must be one of {', '.join(bound.choices)}, got {_show(value)}")
        return value
    if origin is tuple and typing.get_args(hint)[-1:] == (Ellipsis,):
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)) or not bound.min_len <= len(value) <= bound.max_len:
            raise ProtocolError(f"{where} must be a list of {bound.min_len}..{bound.max_len} items")
        return tuple(check_value(v, item, bound, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise ProtocolError(f"{where} must be a list of {len(items)} values, got {_show(value)}")
        return tuple(check_value(v, h, bound, f"{where}[{i}]") for i, (v, h) in enumerate(zip(value, items)))
    if isinstance(hint, type) and issubclass(hint, Record):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ProtocolError(f"{where} must be an object, got {_show(value)}")
        return hint.from_fields(value, where)
    raise ProtocolError(f"{where}: no check for type {hint!r}")  # a bug in a record definition


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Record:
    """A message or a part of one; subclasses are frozen dataclasses whose fields carry
    their bounds. Constructing one checks it, whether from Python or from JSON."""

    OP: ClassVar[str] = ""
    TAKES_FDS: ClassVar[int] = 0  # file descriptors the request must come with

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            bound = item.metadata.get("bound", Bound())
            value = check_value(getattr(self, item.name), hints[item.name], bound, item.name)
            object.__setattr__(self, item.name, value)

    @classmethod
    def from_fields(cls, values: dict[str, Any], where: str = "") -> Any:
        kwargs: dict[str, Any] = {}
        for item in dataclasses.fields(cls):  # type: ignore[arg-type]
            if item.name in values:
                kwargs[item.name] = values[item.name]
            elif item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{where + '.' if where else ''}{item.name} is missing")
        try:
            return cls(**kwargs)
        except ProtocolError as exc:
            raise ProtocolError(f"{where + '.' if where else ''}{exc}") from None

    def fields(self) -> dict[str, Any]:
        return {item.name: _plain(getattr(self, item.name)) for item in dataclasses.fields(self)}  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.fields()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# ---- control messages: application or CLI -> kernelctl ----------------------------------------


@dataclass(frozen=True)
class Filter(Record):
    """One port claim: the function receives (and may send from) ``proto``/``port``."""

    proto: str = bounded(choices=PROTOCOLS)
    port: int = bounded(low=1, high=65535)


@dataclass(frozen=True)
class OpenVnic(Record):
    OP = "open_vnic"
    filters: tuple[Filter, ...] = bounded(min_len=1, max_len=MAX_FILTERS)
    rx_bps: int = bounded(0, high=MAX_RATE_BPS)
    tx_bps: int = bounded(0, high=MAX_RATE_BPS)
    name: str = bounded("", max_len=MAX_NAME)
    # Queue pairs (one per worker process; receive-side scaling spreads flows over them).
    # The device host refuses more than its function can hold.
    queues: int = bounded(1, low=1, high=MAX_QUEUES)


@dataclass(frozen=True)
class OpenVsa(Record):
    OP = "open_vsa"
    name: str = bounded(min_len=1, max_len=MAX_NAME)
    write: bool = bounded(True)
    iops: int = bounded(0, high=MAX_IOPS)
    bps: int = bounded(0, high=MAX_RATE_BPS)


@dataclass(frozen=True)
class AddFilter(Record):
    OP = "add_filter"
    function_id: int = bounded(low=1, high=U32)
    proto: str = bounded(choices=PROTOCOLS)
    port: int = bounded(low=1, high=65535)


@dataclass(frozen=True)
class SetRate(Record):
    OP = "set_rate"
    function_id: int = bounded(low=1, high=U32)
    rx_bps: int = bounded(0, high=MAX_RATE_BPS)
    tx_bps: int = bounded(0, high=MAX_RATE_BPS)


@dataclass(frozen=True)
class Status(Record):
    OP = "status"


@dataclass(frozen=True)
class Shutdown(Record):
    OP = "shutdown"


@dataclass(frozen=True)
class VsaCreate(Record):
    OP = "vsa_create"
    name: str = bounded(min_len=1, max_len=MAX_NAME)
    size_bytes: int = bounded(low=1, high=MAX_VSA_BYTES)


@dataclass(frozen=True)
class VsaResize(Record):
    OP = "vsa_resize"
    name: str = bounded(min_len=1, max_len=MAX_NAME)
    size_bytes: int = bounded(low=1, high=MAX_VSA_BYTES)


@dataclass(frozen=True)
class VsaDelete(Record):
    OP = "vsa_delete"
    name: str = bounded(min_len=1, max_len=MAX_NAME)


@dataclass(frozen=True)
class VsaList(Record):
    OP = "vsa_list"


@dataclass(frozen=True)
class VsaGrant(Record):
    OP = "vsa_grant"
    name: str = bounded(min_len=1, max_len=MAX_NAME)
    uid: int = bounded(low=0, high=U32)
    mode: str = bounded(choices=("ro", "rw"))


@dataclass(frozen=True)
class VsaRevoke(Record):
    OP = "vsa_revoke"
    name: str = bounded(min_len=1, max_len=MAX_NAME)
    uid: int = bounded(low=0, high=U32)


# ---- the name tree (kernelctl/nametree.py) ----------------------------------------------------


@dataclass(frozen=True)
class NameSpec(Record):
    """One name a file server publishes: a file it serves, or a directory to hold some."""

    path: str = bounded(min_len=1, max_len=MAX_PATH)
    mode: int = bounded(0o644, high=0o7777)
    kind: str = bounded("served", choices=("served", "dir"))


@dataclass(frozen=True)
class NameServe(Record):
    """Become a file server: the fd is the server's end of a SOCK_SEQPACKET pair on which
    kernelctl hands it one connected socket per opener. Its names live as long as that fd."""

    OP = "name_serve"
    TAKES_FDS = 1
    names: tuple[NameSpec, ...] = bounded(min_len=1, max_len=MAX_NAMES_PER_REQUEST)


@dataclass(frozen=True)
class NamePublish(Record):
    """More names for a server this connection started."""

    OP = "name_publish"
    server: int = bounded(low=1, high=U32)
    names: tuple[NameSpec, ...] = bounded(min_len=1, max_len=MAX_NAMES_PER_REQUEST)


@dataclass(frozen=True)
class NameMake(Record):
    """A lasting name: a directory, or a file in the file store of a VSA (target VSA:FILE)."""

    OP = "name_make"
    path: str = bounded(min_len=1, max_len=MAX_PATH)
    kind: str = bounded(choices=("dir", "store"))
    mode: int = bounded(0o755, high=0o7777)
    target: str = bounded("", max_len=MAX_PATH)


@dataclass(frozen=True)
class NameOpen(Record):
    """Open a name: access is checked here, once. ``as_uid``/``as_gid`` (root only: the
    FUSE export acting for a local process) check for another caller than the connection's."""

    OP = "name_open"
    path: str = bounded(min_len=1, max_len=MAX_PATH)
    write: bool = bounded(False)
    as_uid: int = bounded(U32, high=U32)
    as_gid: int = bounded(U32, high=U32)


@dataclass(frozen=True)
class NameList(Record):
    OP = "name_list"
    path: str = bounded(min_len=1, max_len=MAX_PATH)
    as_uid: int = bounded(U32, high=U32)
    as_gid: int = bounded(U32, high=U32)


@dataclass(frozen=True)
class NameStat(Record):
    OP = "name_stat"
    path: str = bounded(min_len=1, max_len=MAX_PATH)
    as_uid: int = bounded(U32, high=U32)
    as_gid: int = bounded(U32, high=U32)


@dataclass(frozen=True)
class NameRemove(Record):
    OP = "name_remove"
    path: str = bounded(min_len=1, max_len=MAX_PATH)


# ---- management messages: kernelctl -> device host ---------------------------------------------


@dataclass(frozen=True)
class VnicCreateFunction(Record):
    """A VNIC function; the fd is the device end of the application's vfio-user socket."""

    OP = "create_function"
    TAKES_FDS = 1
    function_id: int = bounded(low=0, high=U32)
    ip: str = bounded(min_len=7, max_len=15)
    rx_filters: tuple[Filter, ...] = bounded((), max_len=MAX_FILTERS)
    queues: int = bounded(1, low=1, high=MAX_QUEUES)
    rx_bps: int = bounded(0, high=MAX_RATE_BPS)
    tx_bps: int = bounded(0, high=MAX_RATE_BPS)
    owner_pid: int = bounded(0, high=U32)
    owner_uid: int = bounded(0, high=U32)
    name: str = bounded("", max_len=MAX_NAME + 8)


@dataclass(frozen=True)
class VsicCreateFunction(Record):
    """A storage function over ``extents`` ([physical_block, block_count] pairs)."""

    OP = "create_function"
    TAKES_FDS = 1
    function_id: int = bounded(low=0, high=U32)
    extents: tuple[tuple[int, int], ...] = bounded(min_len=1, max_len=MAX_EXTENTS, high=U64)
    read_only: bool = bounded(False)
    queues: int = bounded(1, low=0, high=U32)  # the device checks its own queue count
    iops: int = bounded(0, high=U64)
    bps: int = bounded(0, high=U64)
    owner_pid: int = bounded(0, high=U32)
    owner_uid: int = bounded(0, high=U32)
    name: str = bounded("", max_len=MAX_NAME + 8)


@dataclass(frozen=True)
class DestroyFunction(Record):
    OP = "destroy_function"
    function_id: int = bounded(low=0, high=U32)


@dataclass(frozen=True)
class Stats(Record):
    OP = "stats"


@dataclass(frozen=True)
class HostShutdown(Record):
    OP = "shutdown"


@dataclass(frozen=True)
class HostAddFilter(Record):
    OP = "add_filter"
    function_id: int = bounded(low=0, high=U32)
    proto: str = bounded(choices=PROTOCOLS)
    port: int = bounded(low=1, high=65535)


@dataclass(frozen=True)
class HostRemoveFilter(Record):
    """Take a claim back: the function's receive and transmit filters for ``proto``/``port``."""

    OP = "remove_filter"
    function_id: int = bounded(low=0, high=U32)
    proto: str = bounded(choices=PROTOCOLS)
    port: int = bounded(low=1, high=65535)


@dataclass(frozen=True)
class HostSetRate(Record):
    OP = "set_rate"
    function_id: int = bounded(low=0, high=U32)
    rx_bps: int = bounded(0, high=MAX_RATE_BPS)
    tx_bps: int = bounded(0, high=MAX_RATE_BPS)


# Controller flows (vdev.vnic.flows): kernelctl's OpenFlow switch installs them in the VNIC.
FLOW_FIELDS = ("eth_dst", "eth_src", "eth_type", "ip_proto", "ipv4_src", "ipv4_dst", "l4_src", "l4_dst")
U48 = (1 << 48) - 1
MAX_FLOW_OUTPUTS = 8
MAX_FLOW_BATCH = 1024  # flows removed by one request
MAX_PACKET_IN = 1514  # bytes of a frame a packet-in event or a packet-out carries


@dataclass(frozen=True)
class FlowField(Record):
    """One matched field; the device checks the value against the field's width."""

    name: str = bounded(choices=FLOW_FIELDS)
    value: int = bounded(high=U48)
    mask: int = bounded(low=1, high=U48)


@dataclass(frozen=True)
class FlowOutput(Record):
    function_id: int = bounded(low=0, high=U32)
    queue: int = bounded(0, high=MAX_QUEUES - 1)


@dataclass(frozen=True)
class HostAddFlow(Record):
    OP = "add_flow"
    priority: int = bounded(high=0xFFFF)
    match: tuple[FlowField, ...] = bounded((), max_len=len(FLOW_FIELDS))
    outputs: tuple[FlowOutput, ...] = bounded((), max_len=MAX_FLOW_OUTPUTS)
    to_controller: bool = bounded(False)
    controller_len: int = bounded(0, high=0xFFFF)
    meter: int = bounded(0, high=U32)


@dataclass(frozen=True)
class HostRemoveFlows(Record):
    OP = "remove_flows"
    flow_ids: tuple[int, ...] = bounded(min_len=1, max_len=MAX_FLOW_BATCH, high=U32)


@dataclass(frozen=True)
class HostSetMeter(Record):
    """A controller's meter in the VNIC: a drop band of ``rate_kbps`` (0: remove the meter)."""

    OP = "set_meter"
    meter_id: int = bounded(low=1, high=U32)
    rate_kbps: int = bounded(high=MAX_RATE_BPS // 1000)
    burst_kb: int = bounded(0, high=U32)


@dataclass(frozen=True)
class HostPacketOut(Record):
    """A frame from the controller: onto the wire, through the receive table as if it came
    from the wire, to the default function, or into a function's queue."""

    OP = "packet_out"
    target: str = bounded(choices=("wire", "table", "local", "function"))
    data: str = bounded(min_len=28, max_len=2 * MAX_PACKET_IN)  # hex; at least an Ethernet header
    function_id: int = bounded(0, high=U32)
    queue: int = bounded(0, high=MAX_QUEUES - 1)


@dataclass(frozen=True)
class SetLimits(Record):
    OP = "set_limits"
    function_id: int = bounded(low=0, high=U32)
    iops: int = bounded(0, high=U64)
    bps: int = bounded(0, high=U64)


# ---- envelopes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A request as it arrived: its id (None when the envelope was unreadable) and record."""

    id: int
    body: Record


@dataclass(frozen=True)
class Reply:
    id: int | None
    ok: bool
    result: Any = None
    error: str = ""

    def to_json(self) -> bytes:
        message: dict[str, Any] = {"id": self.id, "ok": self.ok}
        if self.ok:
            message["result"] = self.result
        else:
            message["error"] = self.error
        return encode_json(message)


@dataclass(frozen=True)
class FunctionClosed:
    """Device host -> kernelctl: the application of ``function_id`` went away."""

    function_id: int

    def to_json(self) -> bytes:
        return encode_json({"event": "function_closed", "function_id": self.function_id})


@dataclass(frozen=True)
class PacketInEvent:
    """VNIC host -> kernelctl: a controller flow (``flow_id``) sent a frame to the
    controller; ``data`` is its first bytes, ``total_len`` its length."""

    flow_id: int
    total_len: int
    data: bytes

    def to_json(self) -> bytes:
        return encode_json(
            {"event": "packet_in", "flow_id": self.flow_id, "total_len": self.total_len, "data": self.data.hex()}
        )

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> PacketInEvent:
        flow_id, total_len, data = message.get("flow_id"), message.get("total_len"), message.get("data")
        if not isinstance(flow_id, int) or isinstance(flow_id, bool) or not 0 <= flow_id <= U32:
            raise ProtocolError("packet_in without a flow_id")
        if not isinstance(total_len, int) or isinstance(total_len, bool) or not 0 <= total_len <= 0xFFFF:
            raise ProtocolError("packet_in without a total_len")
        if not isinstance(data, str) or len(data) > 2 * MAX_PACKET_IN:
            raise ProtocolError("packet_in data must be hex of at most a frame")
        try:
            return cls(flow_id, total_len, bytes.fromhex(data))
        except ValueError:
            raise ProtocolError("packet_in data is not hex") from None


class RequestRefused(ProtocolError):
    """A request whose envelope was read (``request_id`` known) but whose body was refused."""

    def __init__(self, request_id: int | None, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


def request_json(request_id: int, body: Record) -> bytes:
    return encode_json({"id": request_id, "op": body.OP, **body.fields()})


def raw_request_json(request_id: int, op: str, fields: dict[str, Any]) -> bytes:
    """A request built from loose fields (``ControlClient.request``); the receiver checks it."""
    return encode_json({**fields, "id": request_id, "op": op})


class Protocol:
    """The requests one receiver understands: a table from op to record class."""

    def __init__(self, name: str, records: Iterable[type[Record]]) -> None:
        self.name = name
        self.records: dict[str, type[Record]] = {}
        for record in records:
            if not record.OP or record.OP in self.records:
                raise ValueError(f"{name}: op {record.OP!r} defined twice or not at all")
            self.records[record.OP] = record
            _hints(record)  # resolved now, not on a caller's first request

    def decode(self, payload: bytes) -> Request:
        """The checked request in ``payload``; ``RequestRefused`` says why not."""
        if len(payload) > MAX_REQUEST:
            raise RequestRefused(None, f"request of {len(payload)} bytes (at most {MAX_REQUEST})")
        try:
            message = decode_json(payload)
        except ProtocolError as exc:
            raise RequestRefused(None, str(exc)) from None
        request_id = message.get("id")
        if not isinstance(request_id, int) or isinstance(request_id, bool) or not 0 <= request_id <= MAX_ID:
            raise RequestRefused(None, f"id must be an integer in [0, {MAX_ID}]")
        op = message.get("op")
        record = self.records.get(op) if isinstance(op, str) else None
        if record is None:
            raise RequestRefused(request_id, f"unknown request {_show(op)}")
        try:
            return Request(request_id, record.from_fields(message))
        except ProtocolError as exc:
            raise RequestRefused(request_id, f"{op}: {exc}") from None


def decode_reply(payload: bytes) -> Reply | FunctionClosed | PacketInEvent:
    """A reply or an event (what a requester receives)."""
    message = decode_json(payload)
    if "event" in message:
        if message.get("event") == "packet_in":
            return PacketInEvent.from_message(message)
        if message.get("event") != "function_closed":
            raise ProtocolError(f"unknown event {_show(message.get('event'))}")
        function_id = message.get("function_id")
        if not isinstance(function_id, int) or isinstance(function_id, bool) or not 0 <= function_id <= U32:
            raise ProtocolError("function_closed without a function_id")
        return FunctionClosed(function_id)
    request_id = message.get("id")
    if request_id is not None and (not isinstance(request_id, int) or isinstance(request_id, bool)):
        raise ProtocolError("a reply's id is an integer or null")
    ok = message.get("ok")
    if not isinstance(ok, bool):
        raise ProtocolError("a reply says ok: true or false")
    if ok:
        return Reply(request_id, True, message.get("result"))
    error = message.get("error")
    return Reply(request_id, False, error=str(error)[:4096] if error is not None else "refused")


_hints(Filter)
_hints(NameSpec)
CONTROL = Protocol(
    "control",
    [OpenVnic, OpenVsa, AddFilter, SetRate, Status, Shutdown,
     VsaCreate, VsaResize, VsaDelete, VsaList, VsaGrant, VsaRevoke,
     NameServe, NamePublish, NameMake, NameOpen, NameList, NameStat, NameRemove],
)
_HOST_COMMON: list[type[Record]] = [DestroyFunction, Stats, HostShutdown]
VNIC_MGMT = Protocol(
    "vnic management",
    [VnicCreateFunction, HostAddFilter, HostRemoveFilter, HostSetRate, HostAddFlow, HostRemoveFlows, HostPacketOut, HostSetMeter,
     *_HOST_COMMON],
)
VSIC_MGMT = Protocol("vsic management", [VsicCreateFunction, SetLimits, *_HOST_COMMON])


def peer_gone(exc: OSError) -> bool:
    return exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)

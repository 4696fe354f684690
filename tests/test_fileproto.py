"""The file server RPC: codec round trips, the server session's bounds, and fuzzing of its
parser (random and mutated bytes end that session with an error, never an exception)."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelctl import fileproto as fp
from kernelctl.fileclient import FileClient, FileRpcError
from libos.files.session import MAX_HANDLES, MAX_OUTPUT, Grant, ServerSession
from libos.files.sources import BytesSource, MemoryFile, Source

PATH = "/apps/t/file"


def session(write: bool = False, data: bytes = b"0123456789" * 100) -> tuple[ServerSession, MemoryFile]:
    file = MemoryFile(data, clock=lambda: 1.0)
    sources: dict[str, Source] = {PATH: file, "/apps/t/gen": BytesSource(lambda: b"made", clock=lambda: 1.0)}
    children = {"/apps/t": [(fp.KIND_FILE, "file"), (fp.KIND_FILE, "gen")]}
    return ServerSession(Grant(PATH, 1000, 1000, write), sources.get, children.get), file


def replies(s: ServerSession) -> list[fp.Reply]:
    decoder = fp.FrameDecoder()
    decoder.feed(s.take_output())
    out = []
    while (got := decoder.next_frame()) is not None:
        out.append(fp.decode_reply(*got))
    return out


REQUESTS = [fp.Open(1, PATH, True), fp.Read(2, 7, 1 << 40, fp.MAX_IO), fp.Write(3, 1, 5, b"abc"),
            fp.Stat(4, 9), fp.ReadDir(5, 1, 3), fp.Close(6, 0xFFFFFFFF)]
REPLIES = [fp.Opened(1, 2, fp.Attr(fp.KIND_DIR, 0o755, 10, 99)), fp.Data(2, b"x" * 100), fp.Written(3, 3),
           fp.Stated(4, fp.Attr(fp.KIND_FILE, 0o644, 1 << 40, 0)), fp.DirEntries(5, 0, ((1, "a"), (2, "bé"))),
           fp.Closed(6), fp.Error(7, errno.ENOENT, "gone")]


@pytest.mark.parametrize("message", REQUESTS)
def test_requests_round_trip(message: fp.Request) -> None:
    decoder = fp.FrameDecoder()
    decoder.feed(fp.encode_request(message))
    got = decoder.next_frame()
    assert got is not None and fp.decode_request(*got) == message


@pytest.mark.parametrize("message", REPLIES)
def test_replies_round_trip(message: fp.Reply) -> None:
    decoder = fp.FrameDecoder()
    decoder.feed(fp.encode_reply(message))
    got = decoder.next_frame()
    assert got is not None and fp.decode_reply(*got) == message


def test_a_read_session() -> None:
    s, file = session()
    s.receive(b"".join(fp.encode_request(r) for r in (
        fp.Open(1, PATH, False), fp.Read(2, 1, 995, 100), fp.Stat(3, 1), fp.Write(4, 1, 0, b"x"),
        fp.Open(5, "/apps/t/gen", False), fp.Open(6, PATH, True), fp.Close(7, 1), fp.Read(8, 1, 0, 1))))
    opened, data, stated, refused, other, rw, closed, after = replies(s)
    assert isinstance(opened, fp.Opened) and opened.attr.size == 1000
    assert data == fp.Data(2, b"56789")
    assert isinstance(stated, fp.Stated) and stated.attr.size == 1000
    assert isinstance(refused, fp.Error) and refused.errno == errno.EBADF  # granted for reading
    assert isinstance(other, fp.Error) and other.errno == errno.EACCES  # another name than granted
    assert isinstance(rw, fp.Error) and rw.errno == errno.EACCES
    assert closed == fp.Closed(7)
    assert isinstance(after, fp.Error) and after.errno == errno.EBADF
    assert not s.failed


def test_writes_and_live_growth() -> None:
    s, file = session(write=True, data=b"")
    s.receive(fp.encode_request(fp.Open(1, PATH, True)) + fp.encode_request(fp.Write(2, 1, 3, b"abc")))
    file.append(b"def")
    s.receive(fp.encode_request(fp.Read(3, 1, 0, 100)))
    assert replies(s)[1:] == [fp.Written(2, 3), fp.Data(3, b"\0\0\0abcdef")]


def test_out_of_order_and_unknown_requests() -> None:
    s, _ = session()
    s.receive(fp.encode_request(fp.Read(1, 1, 0, 10)) + fp.encode_request(fp.ReadDir(2, 5, 0)))
    assert [type(r) for r in replies(s)] == [fp.Error, fp.Error]
    s.receive(fp.frame(fp.READ | fp.REPLY, 3, b""))  # a reply sent to the server
    assert s.failed and "not a request" in s.failed


def test_oversized_frames_are_refused_before_buffering() -> None:
    s, _ = session()
    s.receive(struct.pack("!IBI", fp.MAX_FRAME + 1, fp.WRITE, 1))
    assert s.failed and s.decoder.buffered < 16


def test_a_read_past_max_io_is_an_error_reply() -> None:
    s, _ = session()
    s.receive(fp.encode_request(fp.Open(1, PATH, False)) + fp.encode_request(fp.Read(2, 1, 0, fp.MAX_IO + 1)))
    assert isinstance(replies(s)[1], fp.Error)


def test_handles_and_output_are_bounded() -> None:
    s, _ = session(data=b"y" * fp.MAX_IO)
    s.receive(b"".join(fp.encode_request(fp.Open(i, PATH, False)) for i in range(MAX_HANDLES + 1)))
    assert isinstance(replies(s)[-1], fp.Error)
    # A reader that never reads: requests wait once the output is over its bound.
    s.receive(b"".join(fp.encode_request(fp.Read(i, 1, 0, fp.MAX_IO)) for i in range(20)))
    assert not s.wants_input
    held = len(s.take_output(1 << 40))
    assert MAX_OUTPUT <= held <= MAX_OUTPUT + fp.MAX_FRAME
    s.process()
    assert s.has_output()


def test_readdir_pages() -> None:
    s, _ = session()
    s = ServerSession(Grant("/apps/t", 0, 0, False), {}.get,
                      {"/apps/t": [(fp.KIND_FILE, f"{i:0200d}") for i in range(10_000)]}.get)
    s.receive(fp.encode_request(fp.Open(1, "/apps/t", False)) + fp.encode_request(fp.ReadDir(2, 1, 0)))
    page = replies(s)[1]
    assert isinstance(page, fp.DirEntries) and 0 < page.next_cookie == len(page.entries) < 10_000


def _drive(data: bytes) -> None:
    s, _ = session(write=True)
    for at in range(0, len(data), 7):
        s.receive(data[at : at + 7])
        s.take_output()
    s.close()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    _drive(data)


_FRAMES = st.one_of(
    st.builds(lambda p, w: fp.encode_request(fp.Open(1, p, w)), st.text(max_size=30), st.booleans()),
    st.builds(lambda h, o, c: fp.encode_request(fp.Read(2, h, o, c)), st.integers(0, 3),
              st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
    st.builds(lambda h, o, d: fp.encode_request(fp.Write(3, h, o, d)), st.integers(0, 3),
              st.integers(0, 2**64 - 1), st.binary(max_size=40)),
    st.builds(lambda h: fp.encode_request(fp.Stat(4, h)), st.integers(0, 3)),
    st.builds(lambda h, c: fp.encode_request(fp.ReadDir(5, h, c)), st.integers(0, 3), st.integers(0, 2**32 - 1)),
    st.builds(lambda h: fp.encode_request(fp.Close(6, h)), st.integers(0, 3)),
    st.just(fp.encode_request(fp.Open(7, PATH, True))),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_FRAMES, max_size=12), st.integers(0, 400), st.binary(max_size=8), st.booleans())
def test_fuzz_mutated_valid_streams(frames: list[bytes], cut: int, junk: bytes, truncate: bool) -> None:
    stream = b"".join(frames)
    if truncate:
        stream = stream[:cut]
    else:
        stream = stream[:cut] + junk + stream[cut:]
    _drive(stream)


def test_a_writer_cannot_make_the_server_allocate_at_will() -> None:
    s, file = session(write=True, data=b"")
    s.receive(fp.encode_request(fp.Open(1, PATH, True)) + fp.encode_request(fp.Write(2, 1, 1 << 40, b"x")))
    reply = replies(s)[1]
    assert isinstance(reply, fp.Error) and reply.errno == errno.EFBIG and len(file.data) == 0


# ---- the reader's side against a hostile or dead server ------------------------------------------


def _client_against(server_bytes: bytes, close: bool, timeout: float = 2.0) -> FileRpcError:
    import socket
    import threading

    ours, theirs = socket.socketpair()

    def serve() -> None:
        theirs.recv(4096)  # the request
        theirs.sendall(server_bytes)
        if close:
            theirs.close()

    thread = threading.Thread(target=serve)
    thread.start()
    client = FileClient(ours, timeout=timeout)
    with pytest.raises(FileRpcError) as failed:
        client.read(1, 0, 10)
    thread.join()
    client.close_connection()
    if not close:
        theirs.close()
    return failed.value


@pytest.mark.parametrize("server_bytes, close", [
    (b"", True),  # dies before answering
    (b"\xff" * 20, False),  # garbage
    (struct.pack("!IBI", fp.MAX_FRAME + 1, fp.READ | fp.REPLY, 1), False),  # an oversized reply
    (fp.encode_reply(fp.Data(99, b"x")), False),  # a reply to another request
    (fp.encode_reply(fp.Written(1, 3)), False),  # the wrong kind of reply
    (b"", False),  # says nothing: the timeout
])
def test_a_hostile_or_dead_server_is_eio_for_the_reader(server_bytes: bytes, close: bool) -> None:
    assert _client_against(server_bytes, close, timeout=0.5).errno == errno.EIO


def test_an_error_reply_keeps_its_errno() -> None:
    assert _client_against(fp.encode_reply(fp.Error(1, errno.ENOENT, "gone")), False).errno == errno.ENOENT


def test_a_failing_source_is_an_error_reply_not_the_end_of_the_server() -> None:
    def broken() -> bytes:
        raise RuntimeError("dictionary changed size during iteration")

    s = ServerSession(Grant("/apps/t/gen", 0, 0, False), {"/apps/t/gen": BytesSource(broken)}.get, {}.get)
    s.receive(fp.encode_request(fp.Open(1, "/apps/t/gen", False)))
    reply = replies(s)[0]
    assert isinstance(reply, fp.Error) and reply.errno == errno.EIO and not s.failed

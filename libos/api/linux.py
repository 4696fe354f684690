"""The ``linux`` backend: the same queue API over kernel sockets, the baseline.

It must be a fair, well-tuned baseline, never a strawman: non-blocking sockets, one epoll
set, level-triggered readiness, and every readable socket drained until EAGAIN (up to a
burst) so that a busy server pays one ``epoll_wait`` per burst, not per datagram. What is left
per request is what Linux costs: ``recvfrom`` and ``sendto`` system calls and the kernel's
network stack behind them.
"""

from __future__ import annotations

import select
import socket as socket_module
from collections import deque

from libos.api.queues import PollingRuntime, QueueTable
from libos.api.types import Address, LibOSError, Opcode, SocketKind

RECV_BURST = 64
RECV_SIZE = 65536
MAX_PENDING_SENDS = 1024


class LinuxLibOS(PollingRuntime):
    backend = "linux"

    def __init__(self, netns: str | None = None) -> None:
        if netns:
            # The baseline host is a network namespace of its own (DESIGN section 2).
            from pyroute2 import netns as pyroute2_netns

            pyroute2_netns.setns(netns)
        self.table = QueueTable()
        self._epoll = select.epoll()
        self._sockets: dict[int, socket_module.socket] = {}
        self._by_fd: dict[int, int] = {}
        self._readable: set[int] = set()
        self._unsent: dict[int, deque[tuple[bytes, Address]]] = {}

    def socket(self, kind: SocketKind) -> int:
        if kind is not SocketKind.UDP:
            raise LibOSError("the linux backend offers UDP queues so far")
        sock = socket_module.socket(socket_module.AF_INET, socket_module.SOCK_DGRAM)
        sock.setblocking(False)
        qd = self.table.new_queue(kind)
        self._sockets[qd] = sock
        self._by_fd[sock.fileno()] = qd
        self._unsent[qd] = deque()
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        return qd

    def _sock(self, qd: int) -> socket_module.socket:
        self.table.check(qd)
        return self._sockets[qd]

    def bind(self, qd: int, address: Address) -> None:
        try:
            self._sock(qd).bind(address)
        except OSError as exc:
            raise LibOSError(f"bind {address}: {exc.strerror}") from None

    def pop(self, qd: int) -> int:
        return self.table.pop(qd)

    def pushto(self, qd: int, data: bytes, address: Address) -> int:
        sock = self._sock(qd)
        unsent = self._unsent[qd]
        if not unsent:
            try:
                sock.sendto(data, address)
                self.table.counters.pushed += 1
                return self.table.completed(Opcode.PUSH, qd)
            except BlockingIOError:
                pass
            except OSError as exc:
                self.table.counters.push_failed += 1
                return self.table.completed(Opcode.FAILED, qd, error=exc.strerror or str(exc))
        if len(unsent) >= MAX_PENDING_SENDS:
            self.table.counters.push_failed += 1
            return self.table.completed(Opcode.FAILED, qd, error="send queue full")
        unsent.append((data, address))
        self._epoll.modify(sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        return self.table.completed(Opcode.PUSH, qd)

    def _progress(self, now: float) -> int:
        work = 0
        table = self.table
        for qd in list(self._readable):
            sock = self._sockets.get(qd)
            if sock is None:
                self._readable.discard(qd)
                continue
            for _ in range(RECV_BURST):
                try:
                    data, address = sock.recvfrom(RECV_SIZE)
                except BlockingIOError:
                    self._readable.discard(qd)
                    break
                except OSError:
                    # ICMP errors surface here (ECONNREFUSED); a server ignores them.
                    continue
                table.deliver(qd, data, address)
                work += 1
        return work

    def _flush(self, qd: int) -> None:
        sock = self._sockets[qd]
        unsent = self._unsent[qd]
        while unsent:
            data, address = unsent[0]
            try:
                sock.sendto(data, address)
            except BlockingIOError:
                return
            except OSError:
                self.table.counters.push_failed += 1
            else:
                self.table.counters.pushed += 1
            unsent.popleft()
        self._epoll.modify(sock.fileno(), select.EPOLLIN)

    def _sleep(self, timeout: float) -> None:
        if self._readable:
            return  # a burst was cut short: more is waiting, no need to ask the kernel
        for fd, mask in self._epoll.poll(timeout):
            qd = self._by_fd.get(fd)
            if qd is None:
                continue
            if mask & select.EPOLLOUT:
                self._flush(qd)
            if mask & (select.EPOLLIN | select.EPOLLERR):
                self._readable.add(qd)

    def close(self, qd: int) -> None:
        sock = self._sock(qd)
        self.table.drop_queue(qd)
        self._epoll.unregister(sock.fileno())
        del self._by_fd[sock.fileno()]
        del self._sockets[qd]
        del self._unsent[qd]
        sock.close()

    def shutdown(self) -> None:
        for qd in list(self._sockets):
            self.close(qd)
        self._epoll.close()

    def stats(self) -> dict[str, object]:
        return {"backend": self.backend, "queues": self.table.counters.as_dict()}

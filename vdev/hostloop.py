"""The loop every device host process runs, whatever its device.

A device host (``vdev.vnic.host``, ``vdev.vsic.host``) serves one virtual device: the
management channel to kernelctl (``vdev.control``: checked records, never a blocking send), one vfio-user session per function, and the
device's own work. Its loop has two modes:

* **busy**: while work keeps coming it polls the device and its sockets without sleeping, so
  a busy application posts work with plain stores and never needs a doorbell (a system call);
* **asleep**: after ``spin`` seconds without work it tells every ring it is asleep, looks at
  the rings once more (work posted while it was deciding must not be slept through), and
  blocks in epoll until a doorbell (a trapped REGION_WRITE on a vfio-user socket), a
  management message, a wire frame, or the device's next deadline.

An idle device host therefore uses no CPU. A misbehaving application can only hurt its own
function: an error in one vfio-user session closes that session and removes that function.
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from vdev import control
from vdev.vfio_user.server import VfioUserServerConnection

MAX_SLEEP = 0.05  # a lost wakeup (see vdev.ring) costs at most this much latency
# Hardware polls for free; this host's polling competes for CPUs with the applications, the
# clients and the other device host it serves, and on a small machine a poller that never
# lets go adds whole scheduler slices to their latency (docs/design.md, "Polling on a small
# machine", has the measurements behind these numbers). So while busy the loop polls:
#
# * tightly, for TIGHT_POLL, only after it delivered a frame from the wire: an application
#   is answering it right now and its answer is worth catching at once. Each pass gives the
#   core to any other runnable task first (sched_yield), so the spin only uses idle time;
# * relaxed otherwise, until the spin window closes: a sleep of RELAXED_POLL between looks
#   at the rings, which any doorbell, wire frame or management message ends early.
TIGHT_POLL = 0.0002
RELAXED_POLL = 0.0001
# Linux lets a sleep of RELAXED_POLL overrun by the timer slack, 50 us by default: half as
# much again. A device host wants its short sleeps on time.
TIMER_SLACK_NS = 1000
_PR_SET_TIMERSLACK = 29
MAX_FUNCTIONS = 64


class HostedDevice(Protocol):
    """What the loop needs from the device it serves."""

    def set_asleep(self, asleep: bool) -> None: ...

    def sync_rings(self) -> None: ...

    def raise_irqs(self) -> None: ...

    def remove_function(self, function_id: int) -> None: ...

    def snapshot(self) -> dict[str, object]: ...

    def close(self) -> None: ...


class DeviceHostBase:
    """The loop, the vfio-user sessions and the management channel of a device host.

    A subclass provides:

    * ``_deadline()``: when the device wants to run again while idle (a rate limiter that
      stopped a ring), or None;
    * ``_has_work(now)``: whether a ring holds work (looked at just before sleeping);
    * ``_poll(now)``: one bounded pass of the device's work; how much it did;
    * ``_on_wire(queue, now)``: a wire fd (registered in ``_wire_fds``, fd -> queue) is
      readable; how much it did. Devices without a wire leave ``_wire_fds`` empty;
    * ``PROTOCOL``: its management requests (``vdev.control``), each a checked record;
    * ``_device_handlers()``: the handler of each request only this device knows, by record
      class (``create_function`` among them: it ends with ``_add_session``; when it refuses,
      it leaves the fds unowned, for the loop closes them);
    * ``MGMT_ERRORS``: the exceptions a bad request may raise (each answered as an error;
      any other exception is answered too, and its traceback logged).
    """

    MGMT_ERRORS: ClassVar[tuple[type[Exception], ...]] = (ValueError, KeyError, TypeError, OSError)
    PROTOCOL: ClassVar[control.Protocol]

    def __init__(self, device: HostedDevice, mgmt_sock: socket.socket, spin: float) -> None:
        self.device = device
        self.mgmt = mgmt_sock
        self.spin = spin
        self.epoll = select.epoll()
        self.running = True
        self._wire_fds: dict[int, int] = {}
        self._conns: dict[int, tuple[VfioUserServerConnection, int]] = {}
        self._busy_until = 0.0
        self._last_work = 0.0
        self._tight_until = 0.0
        self.channel = control.Channel(mgmt_sock, max_input=control.MAX_REQUEST)
        self._mgmt_events = select.EPOLLIN
        self.epoll.register(self.mgmt.fileno(), select.EPOLLIN)
        self._handlers: dict[type[control.Record], Callable[[Any, list[int]], object]] = {
            control.DestroyFunction: self._destroy_function,
            control.Stats: self._stats,
            control.HostShutdown: self._shutdown,
            **self._device_handlers(),
        }
        missing = set(self.PROTOCOL.records.values()) - set(self._handlers)
        if missing:
            raise TypeError(f"no handler for {sorted(r.OP for r in missing)}")

    # ---- hooks ---------------------------------------------------------------------------

    def _deadline(self) -> float | None:
        return None

    def _has_work(self, now: float) -> bool:
        raise NotImplementedError

    def _poll(self, now: float) -> int:
        raise NotImplementedError

    def _on_wire(self, queue: int, now: float) -> int:
        return 0

    def _device_handlers(self) -> dict[type[control.Record], Callable[[Any, list[int]], object]]:
        raise NotImplementedError

    # ---- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        device = self.device
        poll = self.epoll.poll
        monotonic = time.monotonic
        wire_fds = self._wire_fds
        epoll_fd = [self.epoll.fileno()]
        while self.running:
            now = monotonic()
            busy = now < self._busy_until
            if busy:
                timeout = 0.0
                if now >= self._tight_until:
                    # Relaxed polling: a short sleep that any frame, doorbell or message ends.
                    select.select(epoll_fd, (), (), RELAXED_POLL)
                else:
                    # Tight polling, but never ahead of another task that wants this core.
                    os.sched_yield()
            else:
                timeout = MAX_SLEEP
                deadline = self._deadline()
                if deadline is not None:
                    timeout = max(0.0, min(timeout, deadline - now))
                device.set_asleep(True)
                device.sync_rings()
                if self._has_work(now):
                    timeout = 0.0  # posted while we were deciding: no sleep after all
            events = poll(timeout)
            now = monotonic()
            if not busy:
                device.set_asleep(False)
                device.sync_rings()
            work = 0
            wire_work = 0
            for fd, mask in events:
                queue = wire_fds.get(fd)
                if queue is not None:
                    wire_work += self._on_wire(queue, now)
                elif fd == self.mgmt.fileno():
                    self._on_mgmt(mask)
                else:
                    work += self._on_vfio(fd, mask)
            work += wire_work + self._poll(now)
            device.raise_irqs()
            if work:
                # From the end of the work, not its start: a long flush must not send the
                # host to sleep the moment it finishes.
                self._last_work = monotonic()
                self._busy_until = self._last_work + self.spin
                if wire_work:
                    # Frames went to an application: its answer comes within microseconds.
                    self._tight_until = self._last_work + TIGHT_POLL

    def wake(self, function: object) -> None:
        # A doorbell: the driver posted work while we slept. Stay awake to poll its rings.
        self._last_work = time.monotonic()
        self._busy_until = self._last_work + self.spin

    # ---- vfio-user sessions ----------------------------------------------------------------

    def _add_session(self, conn: VfioUserServerConnection, function_id: int) -> None:
        self._conns[conn.fileno()] = (conn, function_id)
        self.epoll.register(conn.fileno(), select.EPOLLIN)

    def _on_vfio(self, fd: int, mask: int) -> int:
        entry = self._conns.get(fd)
        if entry is None:
            return 0
        conn, function_id = entry
        try:
            alive = True
            if mask & select.EPOLLOUT:
                alive = conn.on_writable()
            if alive and mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                alive = conn.on_readable()
        except Exception:  # a bug must not take the device host down: drop this session
            traceback.print_exc(file=sys.stderr)
            alive = False
        if not alive:
            self._drop_session(fd, function_id)
        else:
            # Replies that did not fit in the socket wait for EPOLLOUT.
            self.epoll.modify(fd, conn.epoll_events())
        return 1

    def _drop_session(self, fd: int, function_id: int) -> None:
        entry = self._conns.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        if entry is not None:
            entry[0].close()
        self.device.remove_function(function_id)
        self._send(control.FunctionClosed(function_id).to_json())

    # ---- management ------------------------------------------------------------------------

    def _on_mgmt(self, mask: int) -> None:
        channel = self.channel
        if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            for incoming in channel.receive():
                self._answer(incoming)
            if channel.closed:
                # The control plane went away: a device host without one must not linger.
                self.running = False
                return
        self._flush_mgmt()

    def _answer(self, incoming: control.Incoming) -> None:
        """Answer one management request; whatever a handler raises becomes an error reply."""
        fds = incoming.fds
        if incoming.payload is None:
            self._reply(control.Reply(None, False, error=incoming.error))
            return
        try:
            request = self.PROTOCOL.decode(incoming.payload)
        except control.RequestRefused as exc:
            control.close_fds(fds)
            self._reply(control.Reply(exc.request_id, False, error=str(exc)))
            return
        body = request.body
        try:
            if len(fds) != body.TAKES_FDS:
                raise ValueError(f"{body.OP} takes {body.TAKES_FDS} file descriptor(s), got {len(fds)}")
            result = self._handlers[type(body)](body, fds)
        except Exception as exc:
            # A handler that fails leaves the fds unowned (sockets detached), so closing
            # them here is the only close.
            control.close_fds(fds)
            if not isinstance(exc, self.MGMT_ERRORS):
                traceback.print_exc(file=sys.stderr)  # a bug: keep serving, but say so
            self._reply(control.Reply(request.id, False, error=f"{type(exc).__name__}: {exc}"))
        else:
            self._reply(control.Reply(request.id, True, result))

    def _destroy_function(self, body: control.DestroyFunction, fds: list[int]) -> object:
        for fd, (_conn, fid) in list(self._conns.items()):
            if fid == body.function_id:
                self._drop_session(fd, fid)
        self.device.remove_function(body.function_id)
        return None

    def _stats(self, body: control.Stats, fds: list[int]) -> object:
        return self.device.snapshot()

    def _shutdown(self, body: control.HostShutdown, fds: list[int]) -> object:
        self.running = False
        return None

    def _reply(self, reply: control.Reply) -> None:
        try:
            payload = reply.to_json()
        except control.ProtocolError as exc:  # e.g. stats larger than MAX_MESSAGE
            payload = control.Reply(reply.id, False, error=str(exc)).to_json()
        self._send(payload)

    def _send(self, payload: bytes) -> None:
        try:
            self.channel.send(payload)
        except control.ChannelFull as exc:
            # kernelctl stopped reading for good: it will see the host exit and restart it.
            print(f"device host: management channel full, exiting ({exc})", file=sys.stderr, flush=True)
            self.running = False
            return
        self._flush_mgmt()

    def _flush_mgmt(self) -> None:
        try:
            self.channel.flush()
        except OSError as exc:
            if not control.peer_gone(exc):
                traceback.print_exc(file=sys.stderr)
            self.running = False
            return
        # Never block on the channel: what did not fit waits for EPOLLOUT.
        events = select.EPOLLIN | (select.EPOLLOUT if self.channel.pending else 0)
        if events != self._mgmt_events:
            self.epoll.modify(self.mgmt.fileno(), events)
            self._mgmt_events = events

    def close(self) -> None:
        for conn, _fid in list(self._conns.values()):
            conn.close()
        self._conns.clear()
        self.device.close()
        self.epoll.close()


def serve(host: DeviceHostBase, profile_name: str | None = None) -> None:
    """Run ``host`` until it stops, then close it.

    With ``profile_name`` and ``ARRAKIS_PROFILE_DIR`` set (tools/bench --profile), the loop
    runs under cProfile and the profile is written there as ``NAME-PID.prof``, to show where
    the device host's time goes.
    """
    set_timer_slack(TIMER_SLACK_NS)
    profile_dir = os.environ.get("ARRAKIS_PROFILE_DIR") if profile_name else None
    profiler = None
    if profile_dir:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        host.run()
    finally:
        host.close()
        if profiler is not None and profile_dir:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, f"{profile_name}-{os.getpid()}.prof"))


def set_timer_slack(nanoseconds: int) -> bool:
    """Set this thread's timer slack (prctl PR_SET_TIMERSLACK); False where Linux refused.

    Only a latency matter: a host whose slack cannot be set still works, its relaxed polls
    just overrun a little.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(nanoseconds), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False

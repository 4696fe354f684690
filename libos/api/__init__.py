"""The application API: queue descriptors with two backends behind one selector.

    from libos.api import open_libos, SocketKind
    los = open_libos("vnic")            # or "linux"
    qd = los.socket(SocketKind.UDP)
    los.bind(qd, ("0.0.0.0", 7))
    result = los.wait(los.pop(qd))
    los.pushto(qd, result.data, result.address)
"""

from __future__ import annotations

from libos.api.types import Address, LibOS, LibOSError, Opcode, QResult, SocketKind

BACKENDS = ("vnic", "linux")


def open_libos(
    backend: str,
    *,
    instance: str = "",
    netns: str | None = None,
    name: str = "",
    rx_bps: int = 0,
    tx_bps: int = 0,
    poll_window: float | None = None,
    queues: int = 1,
    reuse_port: bool = False,
) -> LibOS:
    """A libOS on ``backend`` for topology instance ``instance`` ("" is the default one).

    ``linux`` runs inside the baseline namespace of the instance unless ``netns`` says
    otherwise ("" stays in the current namespace); ``vnic`` asks that instance's
    kernelctl for a function. ``queues`` (vnic): queue pairs of that function, one per
    worker process; ``reuse_port`` (linux): bind with SO_REUSEPORT, so that several worker
    processes share a port (``libos.apps.workers``).
    """
    from kernelctl.names import topology

    names = topology(instance)
    if backend == "linux":
        from libos.api.linux import LinuxLibOS

        return LinuxLibOS(names.linux_netns if netns is None else netns, reuse_port=reuse_port)
    if backend == "vnic":
        from libos.api.vnic import DEFAULT_POLL_WINDOW, VnicLibOS

        return VnicLibOS(
            names.control_socket,
            name=name,
            rx_bps=rx_bps,
            tx_bps=tx_bps,
            poll_window=DEFAULT_POLL_WINDOW if poll_window is None else poll_window,
            queues=queues,
        )
    raise LibOSError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["Address", "BACKENDS", "LibOS", "LibOSError", "Opcode", "QResult", "SocketKind", "open_libos"]

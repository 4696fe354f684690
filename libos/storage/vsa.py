"""Opening a virtual storage area: ask the control plane once, then drive it directly.

    with open_vsa("redis-log") as vsa:
        log = PersistentLog(vsa.device)

kernelctl checks the caller's uid against the VSA's owner and grants (read-write, or
read-only for a shared VSA opened with ``write=False``) and hands back a vfio-user socket to
the VSIC device host; from then on every read, write and flush is a descriptor on the
function's own ring.
"""

from __future__ import annotations

from typing import Any

from kernelctl.client import ControlClient
from kernelctl.names import topology
from libos.driver.vsic import VsicDriver
from libos.storage.vsic_blockdev import VsicBlockDevice


class VsaHandle:
    def __init__(self, name: str, control: ControlClient, driver: VsicDriver, info: dict[str, Any]) -> None:
        self.name = name
        self.info = info
        self.driver = driver
        self.device = VsicBlockDevice(driver)
        self._control = control

    def close(self) -> None:
        self.driver.close()
        self._control.close()

    def __enter__(self) -> VsaHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_vsa(name: str, *, instance: str = "", write: bool = True, iops: int = 0, bps: int = 0) -> VsaHandle:
    """Open VSA ``name`` of topology instance ``instance`` ("" is the default one)."""
    control = ControlClient(topology(instance).control_socket)
    try:
        sock, info = control.open_vsa(name, write=write, iops=iops, bps=bps)
    except Exception:
        control.close()
        raise
    try:
        driver = VsicDriver(sock)
    except Exception:
        sock.close()
        control.close()
        raise
    return VsaHandle(name, control, driver, info)

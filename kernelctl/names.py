"""Names and addresses of one instance of the topology.

The default instance uses the names in DESIGN.md (netns ``arx-net`` and ``arx-linux``,
bridge ``arxbr0``, tap ``vnic0``). Tests build their own instances side by side, each with a
short unique tag, so every name they create is distinct and starts with ``arx`` or
``vnic`` (Linux limits interface names to 15 characters).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_TAG = re.compile(r"^[a-z0-9]{1,6}$")
RUN_ROOT = Path(os.environ.get("ARRAKIS_RUN_DIR", "/run/arrakis"))
# What must survive `kernelctl down` (the images and the VSA registry) lives here.
STATE_ROOT = Path(os.environ.get("ARRAKIS_STATE_DIR", "/var/lib/arrakis"))


@dataclass(frozen=True)
class Topology:
    tag: str  # "" for the default instance
    client_netns: str  # clients, the bridge, the tap and the veth peer live here
    linux_netns: str  # the baseline host
    bridge: str
    tap: str
    veth_bridge_side: str  # in client_netns, enslaved to the bridge
    veth_linux_side: str  # in linux_netns, the baseline's interface
    ifb: str  # in client_netns: shapes traffic from the apps (tap ingress redirected here)
    subnet_prefix: int = 24
    client_ip: str = "10.10.0.1"
    vnic_ip: str = "10.10.0.2"
    linux_ip: str = "10.10.0.3"

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / (self.tag or "default")

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "kernelctl.sock"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "kernelctl.pid"

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / (self.tag or "default")

    @property
    def image_dir(self) -> Path:
        return self.state_dir / "images"

    @property
    def baseline_mount(self) -> Path:
        """Where the ext4 image of the Linux baseline is mounted (the baseline's files)."""
        return self.state_dir / "baseline"

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.sqlite"

    @property
    def link_names(self) -> tuple[str, ...]:
        return (self.bridge, self.tap, self.veth_bridge_side, self.veth_linux_side, self.ifb)


def topology(tag: str = "") -> Topology:
    """The names for instance ``tag`` ("" is the default instance of DESIGN.md)."""
    if not tag:
        return Topology(
            tag="",
            client_netns="arx-net",
            linux_netns="arx-linux",
            bridge="arxbr0",
            tap="vnic0",
            veth_bridge_side="arxvb0",
            veth_linux_side="arxvl0",
            ifb="arxifb0",
        )
    if not _TAG.match(tag):
        raise ValueError(f"instance tag must be 1-6 lowercase letters or digits, got {tag!r}")
    return Topology(
        tag=tag,
        client_netns=f"arx-{tag}-net",
        linux_netns=f"arx-{tag}-linux",
        bridge=f"arxbr{tag}",
        tap=f"vnic{tag}",
        veth_bridge_side=f"arxvb{tag}",
        veth_linux_side=f"arxvl{tag}",
        ifb=f"arxifb{tag}",
    )

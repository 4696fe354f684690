"""Who may be an OpenFlow controller, and which controller may take a claimed port away::

    [openflow]
    controllers = [1000, 1001]   # besides root
    may_revoke = [0]             # uids whose controllers may delete claimed flows (none by default)

A controller whose uid ``may_revoke`` names can delete a claimed flow (or its transmit
filter): kernelctl then revokes that claim, as if the application had never made it. Without
the grant such a delete is ``OFPFMFC_EPERM``, for root too: by default the isolation between
applications never depends on the controller.

(Read here, like the ``[storage]`` table in ``kernelctl.storage``, so that
``kernelctl.policy`` keeps parsing the port rules only.)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

MAX_UID = 0xFFFFFFFE


class OpenFlowConfigError(Exception):
    """The policy's ``[openflow]`` table is malformed."""


@dataclass(frozen=True)
class OpenFlowAccess:
    controllers: frozenset[int] = frozenset()
    may_revoke: frozenset[int] = frozenset()

    def may_connect(self, uid: int) -> bool:
        return uid == 0 or uid in self.controllers


def _uids(table: dict[str, object], key: str) -> frozenset[int]:
    uids = table.get(key, [])
    if not isinstance(uids, list) or not all(
        isinstance(uid, int) and not isinstance(uid, bool) and 0 <= uid <= MAX_UID for uid in uids
    ):
        raise OpenFlowConfigError(f"[openflow]: {key} must be a list of uids")
    return frozenset(uids)


def parse_access(text: str) -> OpenFlowAccess:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise OpenFlowConfigError(f"policy is not valid TOML: {exc}") from None
    table = document.get("openflow", {})
    if not isinstance(table, dict):
        raise OpenFlowConfigError("'openflow' must be a table ([openflow])")
    unknown = set(table) - {"controllers", "may_revoke"}
    if unknown:
        raise OpenFlowConfigError(f"[openflow]: unknown keys {sorted(unknown)}")
    return OpenFlowAccess(_uids(table, "controllers"), _uids(table, "may_revoke"))


def parse_controllers(text: str) -> frozenset[int]:
    return parse_access(text).controllers


def access(source: str) -> OpenFlowAccess:
    """The ``[openflow]`` table of the policy loaded from ``source`` (the built-in policy
    has none: root only, nobody may revoke)."""
    if source == "built-in":
        return OpenFlowAccess()
    try:
        return parse_access(Path(source).read_text())
    except OSError as exc:
        raise OpenFlowConfigError(f"cannot read the policy {source}: {exc.strerror}") from None

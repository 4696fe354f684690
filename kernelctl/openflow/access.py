"""Who may be an OpenFlow controller: root, and the uids the policy file names::

    [openflow]
    controllers = [1000, 1001]

(Read here, like the ``[storage]`` table in ``kernelctl.storage``, so that
``kernelctl.policy`` keeps parsing the port rules only.)
"""

from __future__ import annotations

import tomllib
from pathlib import Path

MAX_UID = 0xFFFFFFFE


class OpenFlowConfigError(Exception):
    """The policy's ``[openflow]`` table is malformed."""


def parse_controllers(text: str) -> frozenset[int]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise OpenFlowConfigError(f"policy is not valid TOML: {exc}") from None
    table = document.get("openflow", {})
    if not isinstance(table, dict):
        raise OpenFlowConfigError("'openflow' must be a table ([openflow])")
    unknown = set(table) - {"controllers"}
    if unknown:
        raise OpenFlowConfigError(f"[openflow]: unknown keys {sorted(unknown)}")
    uids = table.get("controllers", [])
    if not isinstance(uids, list) or not all(
        isinstance(uid, int) and not isinstance(uid, bool) and 0 <= uid <= MAX_UID for uid in uids
    ):
        raise OpenFlowConfigError("[openflow]: controllers must be a list of uids")
    return frozenset(uids)


def controllers(source: str) -> frozenset[int]:
    """The controller uids of the policy loaded from ``source`` (none for the built-in one)."""
    if source == "built-in":
        return frozenset()
    try:
        return parse_controllers(Path(source).read_text())
    except OSError as exc:
        raise OpenFlowConfigError(f"cannot read the policy {source}: {exc.strerror}") from None

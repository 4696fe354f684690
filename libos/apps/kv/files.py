"""The kv server's names: ``/apps/kv-PORT/keys`` (one key a line) and ``/apps/kv-PORT/info``
(what INFO prints), served live through the file server RPC (``libos.files``).

Each open takes a snapshot, made in the file server's thread: ``list()`` of the keyspace's
dict runs in C under the GIL, so it sees the dict between two commands, never in the middle
of one; INFO reads integers. A reader therefore sees one consistent version per open.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kernelctl.client import ControlClient, ControlError
from kernelctl.names import topology
from libos.apps.kv.commands import KvEngine, info_text
from libos.apps.kv.durable import SNAPSHOT_FILE
from libos.files import BytesSource, Source
from vdev import control


def keys_text(engine: KvEngine) -> bytes:
    keys = list(engine.keyspace.keys())
    return b"".join(key + b"\n" for key in keys)


def kv_names(engine: KvEngine, port: int, clock: Callable[[], float] = time.time) -> list[tuple[str, Source | None, int]]:
    base = f"/apps/kv-{port}"
    return [
        (base, None, 0o755),
        (f"{base}/keys", BytesSource(lambda: keys_text(engine), mode=0o444), 0o444),
        (f"{base}/info", BytesSource(lambda: info_text(engine, clock()) + b"\r\n", mode=0o444), 0o444),
    ]


def name_snapshot(instance: str, port: int, vsa: str) -> None:
    """``/apps/kv-PORT/snapshot``: the durable snapshot, a file of the store on ``vsa``
    (kind ``store``, lasting: it names data that outlives the server). The directory is
    made lasting too, so the file server's names go in it and only they are withdrawn."""
    with ControlClient(topology(instance).control_socket) as client:
        for body in (
            control.NameMake(path=f"/apps/kv-{port}", kind="dir", mode=0o755),
            control.NameMake(path=f"/apps/kv-{port}/snapshot", kind="store", mode=0o644,
                             target=f"{vsa}:{SNAPSHOT_FILE}"),
        ):
            try:
                client.call(body)
            except ControlError as exc:
                if not str(exc).startswith("EEXIST"):
                    raise

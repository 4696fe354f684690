"""The storage data plane through the control plane, as root: open a VSA, log to it."""

from __future__ import annotations

import os

import pytest

from kernelctl.client import ControlError
from kernelctl.names import Topology
from libos.storage.log import PersistentLog
from libos.storage.vsa import open_vsa
from tests.conftest import kernelctl
from tools.nsrun import fork_call

pytestmark = pytest.mark.root


def as_uid(uid: int, fn, *args):  # type: ignore[no-untyped-def]
    def child():  # type: ignore[no-untyped-def]
        os.setgid(uid)
        os.setuid(uid)
        return fn(*args)

    return fork_call(child)


def try_open(tag: str, name: str, write: bool) -> str:
    try:
        with open_vsa(name, instance=tag, write=write) as vsa:
            if write:
                vsa.device.write(0, b"w" * 4096)
            return "ok " + vsa.device.read(0, 1)[:1].decode()
    except ControlError as exc:
        return f"refused: {exc}"


def test_log_on_a_vsa_survives_reopen_and_access_is_checked_once(instance: Topology) -> None:
    kernelctl(instance.tag, "vsa", "create", "applog", "16M")
    with open_vsa("applog", instance=instance.tag) as vsa:
        log = PersistentLog(vsa.device)
        seqs = [log.append(f"record {i}".encode()) for i in range(100)]
        log.close()
    assert seqs == sorted(seqs)
    with open_vsa("applog", instance=instance.tag) as vsa:
        log = PersistentLog(vsa.device)
        assert [data for _seq, data in log.records()] == [f"record {i}".encode() for i in range(100)]
        log.close()
    # Another user: refused, then read-only after a grant, never read-write.
    assert as_uid(1000, try_open, instance.tag, "applog", False).startswith("refused")
    kernelctl(instance.tag, "vsa", "grant", "applog", "1000", "ro")
    assert as_uid(1000, try_open, instance.tag, "applog", True).startswith("refused")
    assert as_uid(1000, try_open, instance.tag, "applog", False).startswith("ok")

"""Fuzzing in CI: every target of tools/fuzz_targets runs for a few seconds under atheris, and
every saved input (seeds, and each finding kept under tests/fuzz_corpus/<target>/) replays
as a regression test.

A saved input must run clean, unless it reproduces a defect listed in
``tools.fuzz_targets.known.KNOWN_OPEN`` (routed to another owner); each such entry must
still reproduce, so an entry outlives its fix by one failing run at most.
"""

from __future__ import annotations

import base64
import random
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

from libos.storage.blockdev import MemoryBlockDevice
from libos.storage.log import PersistentLog
from tools import fuzz
from tools.fuzz_targets import CORPUS_ROOT, TARGETS, crash_signature
from tools.fuzz_targets.known import KNOWN_OPEN
from vdev import layout

# Seconds per target in CI: ten targets, about a second of start-up each, stay around a minute.
CI_SECONDS = 4


def _saved_inputs() -> list[tuple[str, str]]:
    cases: list[tuple[str, str]] = []
    for name, target in TARGETS.items():
        _, seeds = target.load()
        cases += [(name, f"seed-{number}") for number in range(len(seeds()))]
        if target.corpus_dir.is_dir():
            cases += [(name, path.name) for path in sorted(target.corpus_dir.iterdir()) if path.is_file()]
    return cases


def _load(name: str, label: str) -> tuple[Callable[[bytes], None], bytes]:
    harness, seeds = TARGETS[name].load()
    if label.startswith("seed-"):
        return harness, seeds()[int(label.removeprefix("seed-"))]
    return harness, (TARGETS[name].corpus_dir / label).read_bytes()


def _outcome(harness: Callable[[bytes], None], data: bytes) -> tuple[str, str] | None:
    """(signature, traceback) of what the input raised, None when it ran clean."""
    try:
        harness(data)
    except Exception as exc:
        return crash_signature(exc), "".join(traceback.format_exception(exc))
    return None


@pytest.mark.parametrize(("name", "label"), _saved_inputs())
def test_saved_input_replays_clean(name: str, label: str) -> None:
    harness, data = _load(name, label)
    outcome = _outcome(harness, data)
    if outcome is None:
        return
    signature, trace = outcome
    if signature in KNOWN_OPEN:
        pytest.xfail(f"known open defect {signature}: {KNOWN_OPEN[signature]}")
    pytest.fail(f"{name}/{label} breaks the target's contract ({signature}):\n{trace}")


def test_every_known_open_defect_still_reproduces() -> None:
    reproduced: set[str] = set()
    for name, label in _saved_inputs():
        if label.startswith("crash-"):
            outcome = _outcome(*_load(name, label))
            if outcome is not None:
                reproduced.add(outcome[0])
    stale = sorted(set(KNOWN_OPEN) - reproduced)
    assert not stale, f"fixed (no saved input reproduces them any more): remove from KNOWN_OPEN: {stale}"


@pytest.mark.parametrize("name", list(TARGETS))
def test_target_fuzzes_without_new_findings(name: str, tmp_path: Path) -> None:
    # A fixed seed: the same exploration on every CI run; tools/fuzz explores afresh each time.
    result = fuzz.fuzz_target(TARGETS[name], CI_SECONDS, line_coverage=False, workdir=tmp_path, save=False, seed=1)
    assert result.inputs > 0 and result.edges > 0, f"the fuzzer did not run (exit {result.exit_code}):\n{result.log_tail}"
    new = result.new_findings
    details = []
    for finding in new:
        data = Path(finding.file).read_bytes()
        details.append(
            f"{finding.signature} x{finding.count}; save it as tests/fuzz_corpus/{name}/{Path(finding.file).name}, "
            f"base64: {base64.b64encode(data).decode()}"
        )
    assert not new, f"{name}: new findings in {result.inputs} inputs:\n" + "\n".join(details) + "\n" + result.log_tail


def test_corpus_holds_only_known_targets() -> None:
    if CORPUS_ROOT.is_dir():
        assert {p.name for p in CORPUS_ROOT.iterdir() if p.is_dir()} <= set(TARGETS)


# ---- the oracles can fail ---------------------------------------------------------------------


def _first_finding(name: str, budget: int = 4000) -> str | None:
    harness, seeds = TARGETS[name].load()
    rnd = random.Random(7)
    inputs = seeds() + [rnd.randbytes(rnd.randrange(1, 600)) for _ in range(budget)]
    for data in inputs:
        outcome = _outcome(harness, data)
        if outcome is not None:
            return outcome[0]
    return None


def test_vsic_oracle_catches_a_device_that_skips_the_range_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from vdev.vsic.function import VirtualStorageArea

    monkeypatch.setattr(VirtualStorageArea, "in_range", lambda self, block, count: True)
    assert _first_finding("vsic_double_fetch") is not None


def test_vnic_oracle_catches_a_device_that_trusts_a_long_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layout, "VNIC_MAX_FRAME", 4000)
    assert _first_finding("vnic_double_fetch") is not None


# ---- the log defect the fuzzer found, spelled out -----------------------------------------------


def test_log_does_not_revive_records_cut_off_after_a_lost_superblock() -> None:
    """Session A's superblock (the newest) is destroyed after A wrote records; recovery falls
    back to the previous superblock and cuts A's records off. The next session must not
    reuse A's epoch, or A's records line up behind its own and come back on the next open."""
    dev = MemoryBlockDevice(34, 512)
    PersistentLog(dev).close()
    log = PersistentLog(dev)
    for number in range(4):
        log.append(b"A%d" % number)
    newest_slot = log._sb.generation % 2
    image = bytearray(dev.image())
    image[newest_slot * 512 : (newest_slot + 1) * 512] = bytes(512)
    dev = MemoryBlockDevice(34, 512, image=bytes(image))
    recovered = PersistentLog(dev, create=False)
    kept = [payload for _, payload in recovered.records()]
    recovered.append(b"B")
    recovered.close()
    reopened = PersistentLog(dev, create=False)
    assert [payload for _, payload in reopened.records()] == kept + [b"B"]

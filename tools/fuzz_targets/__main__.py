"""The per-target child process of ``tools/fuzz`` (one process per target, so that a target's
coverage counters, its memory and a libFuzzer abort stay its own).

    python -m tools.fuzz_targets run NAME --artifacts DIR --crash-log FILE [libFuzzer args] CORPUS
    python -m tools.fuzz_targets replay NAME --coverage-json FILE --input PATH...

``run`` fuzzes under atheris in keep-going mode: an input that breaks the contract is
saved (``crash-<sha1>``) the first time its signature is seen, counted after that, and the
run goes on, so one shallow bug does not hide the rest of the time budget. ``replay`` runs
saved inputs (files or directories) under coverage.py and writes the lines covered in the
target's modules.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

from tools.fuzz_targets import TARGETS, crash_signature


def _run(name: str, artifacts: Path, crash_log: Path, libfuzzer_args: list[str]) -> None:
    import atheris  # only the fuzzing child needs it

    target = TARGETS[name]
    with atheris.instrument_imports(include=["vdev", "libos", "kernelctl"]):
        harness, _seeds = target.load()
    counts: Counter[str] = Counter()
    files: dict[str, str] = {}
    last_dump = 0.0

    def dump() -> None:
        crash_log.write_text(json.dumps({"counts": counts, "files": files}))

    def one_input(data: bytes) -> None:
        nonlocal last_dump
        try:
            harness(data)
        except Exception as exc:  # every escape is a finding; the run goes on
            signature = crash_signature(exc)
            counts[signature] += 1
            if signature not in files:
                path = artifacts / f"crash-{hashlib.sha1(data).hexdigest()[:16]}"
                path.write_bytes(data)
                files[signature] = str(path)
                sys.stderr.write(f"\n=== new finding {signature} -> {path}\n")
                traceback.print_exception(exc, file=sys.stderr)
                dump()
                last_dump = time.monotonic()
            elif time.monotonic() - last_dump > 1.0:
                dump()
                last_dump = time.monotonic()

    dump()
    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()


def _replay(name: str, paths: list[Path], out: Path) -> None:
    import coverage

    target = TARGETS[name]
    cov = coverage.Coverage(data_file=None, branch=False, include=[_source(m) for m in target.covers])
    cov.start()
    harness, seeds = target.load()
    inputs = list(seeds())
    for path in paths:
        if path.is_dir():
            inputs.extend(p.read_bytes() for p in sorted(path.iterdir()) if p.is_file())
        elif path.is_file():
            inputs.append(path.read_bytes())
    failures = 0
    for data in inputs:
        try:
            harness(data)
        except Exception:
            failures += 1
    cov.stop()
    modules = {}
    covered_total = statements_total = 0
    for module in target.covers:
        _, statements, _excluded, missing, _ = cov.analysis2(_source(module))
        covered = len(statements) - len(missing)
        modules[module] = {"covered": covered, "statements": len(statements)}
        covered_total += covered
        statements_total += len(statements)
    out.write_text(
        json.dumps(
            {"inputs": len(inputs), "failures": failures, "covered": covered_total, "statements": statements_total, "modules": modules}
        )
    )


def _source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"no source for {module}")
    return os.path.realpath(spec.origin)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.fuzz_targets")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run")
    run.add_argument("name", choices=sorted(TARGETS))
    run.add_argument("--artifacts", type=Path, required=True)
    run.add_argument("--crash-log", type=Path, required=True)
    replay = commands.add_parser("replay")
    replay.add_argument("name", choices=sorted(TARGETS))
    replay.add_argument("--coverage-json", type=Path, required=True)
    replay.add_argument("--input", type=Path, action="append", default=[], help="a saved input, or a directory of them")
    args, rest = parser.parse_known_args()
    if args.command == "run":
        _run(args.name, args.artifacts, args.crash_log, rest)
    else:
        if rest:
            parser.error(f"unknown arguments {rest}")
        _replay(args.name, args.input, args.coverage_json)


if __name__ == "__main__":
    main()

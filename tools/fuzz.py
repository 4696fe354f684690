"""Coverage-guided fuzzing of the project's trust boundaries, for a bounded time.

    tools/fuzz --seconds 60 --target all [--json PATH] [--no-line-coverage] [--keep-going-only]

Each target (``tools/fuzz_targets``) runs in its own atheris/libFuzzer process for the given
time, starting from its seeds and the inputs saved under ``tests/fuzz_corpus/<target>/``.
Afterwards the corpus it grew is replayed under coverage.py to count the lines of the
target's modules that the fuzzer reached. The table gives, per target: inputs run, libFuzzer
coverage (``cov``: instrumented edges, ``ft``: features), lines covered, and findings.

A finding (an input that broke the target's contract) is saved as
``tests/fuzz_corpus/<target>/crash-<sha1>`` the first time its signature is seen, and then
replays as a regression test (tests/test_fuzz.py). Signatures listed in ``KNOWN_OPEN`` are
defects routed elsewhere: reported, not counted as new. The exit status is 1 when a new
finding was made, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tools.fuzz_targets import REPO, TARGETS, Target
from tools.fuzz_targets.known import KNOWN_OPEN

_STATUS = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)")
_UNITS = re.compile(r"stat::number_of_executed_units: (\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


@dataclass
class Finding:
    signature: str
    count: int
    file: str
    known: str | None  # where it is routed, for a KNOWN_OPEN signature


@dataclass
class Result:
    target: str
    seconds: float
    inputs: int = 0
    edges: int = 0
    features: int = 0
    corpus: int = 0
    lines_covered: int | None = None
    lines_total: int | None = None
    modules: dict[str, dict[str, int]] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    exit_code: int = 0
    log_tail: str = ""

    @property
    def new_findings(self) -> list[Finding]:
        return [f for f in self.findings if f.known is None]


def fuzz_target(target: Target, seconds: float, line_coverage: bool, workdir: Path, save: bool, seed: int | None = None) -> Result:
    """Fuzz one target; ``seed`` fixes libFuzzer's random seed (CI), None draws one."""
    corpus = workdir / target.name / "corpus"
    artifacts = workdir / target.name / "artifacts"
    corpus.mkdir(parents=True)
    artifacts.mkdir(parents=True)
    crash_log = workdir / target.name / "crashes.json"
    saved = target.corpus_dir
    if saved.is_dir():
        for path in saved.iterdir():
            if path.is_file():
                shutil.copy(path, corpus / path.name)
    _, seeds = target.load()
    for number, seed_input in enumerate(seeds()):
        (corpus / f"seed-{number}").write_bytes(seed_input)
    command = [
        sys.executable,
        "-m",
        "tools.fuzz_targets",
        "run",
        target.name,
        "--artifacts",
        str(artifacts),
        "--crash-log",
        str(crash_log),
        f"-max_total_time={max(1, int(seconds))}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-max_len=4096",
        "-print_final_stats=1",
        "-print_pcs=0",
        f"-artifact_prefix={artifacts}/",
        *([f"-seed={seed}"] if seed is not None else []),
        str(corpus),
    ]
    started = time.monotonic()
    # libFuzzer stops itself at max_total_time; the margin only covers start-up and a stuck input.
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, errors="replace", timeout=seconds + 120, env=_env())
    result = Result(target.name, round(time.monotonic() - started, 1), exit_code=proc.returncode)
    log = proc.stderr
    result.log_tail = log[-3000:]
    statuses = _STATUS.findall(log)
    if statuses:
        result.edges, result.features, result.corpus = (int(v) for v in statuses[-1])
    units = _UNITS.findall(log)
    if units:
        result.inputs = int(units[-1])
    findings: dict[str, tuple[int, str]] = {}
    if crash_log.exists():
        recorded = json.loads(crash_log.read_text())
        for signature, count in recorded["counts"].items():
            findings[signature] = (count, recorded["files"][signature])
    # What libFuzzer itself caught: a timeout, an out-of-memory, a crash below Python.
    for artifact in _ARTIFACT.findall(log):
        kind = Path(artifact).name.split("-", 1)[0]
        findings[f"libfuzzer-{kind}"] = (1, artifact)
    for signature, (count, found_at) in sorted(findings.items()):
        stored = found_at
        if save:
            target.corpus_dir.mkdir(parents=True, exist_ok=True)
            destination = target.corpus_dir / Path(found_at).name
            if not destination.exists():
                shutil.copy(found_at, destination)
            stored = str(destination.relative_to(REPO))
        result.findings.append(Finding(signature, count, stored, KNOWN_OPEN.get(signature)))
    if line_coverage:
        out = workdir / target.name / "coverage.json"
        replay = [sys.executable, "-m", "tools.fuzz_targets", "replay", target.name, "--coverage-json", str(out), "--input", str(corpus)]
        subprocess.run(replay, cwd=REPO, capture_output=True, timeout=600, env=_env(), check=True)
        measured = json.loads(out.read_text())
        result.lines_covered = measured["covered"]
        result.lines_total = measured["statements"]
        result.modules = measured["modules"]
    return result


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def table(results: list[Result]) -> str:
    header = f"{'target':<20} {'secs':>5} {'inputs':>9} {'exec/s':>7} {'edges':>6} {'ft':>6} {'lines':>15} {'findings':>9}  signatures"
    rows = [header, "-" * len(header)]
    for r in results:
        lines = "-" if r.lines_covered is None else f"{r.lines_covered}/{r.lines_total} {100 * r.lines_covered / max(1, r.lines_total or 1):.0f}%"
        per_second = int(r.inputs / r.seconds) if r.seconds else 0
        named = ", ".join(f"{f.signature} x{f.count}" + (" [known]" if f.known else " [NEW]") for f in r.findings)
        rows.append(
            f"{r.target:<20} {r.seconds:>5.0f} {r.inputs:>9} {per_second:>7} {r.edges:>6} {r.features:>6} {lines:>15} {len(r.findings):>9}  {named}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/fuzz", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="fuzzing time per target")
    parser.add_argument("--target", default="all", help=f"all, or a comma-separated list of: {', '.join(TARGETS)}")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--no-line-coverage", action="store_true", help="skip the coverage.py replay")
    parser.add_argument("--no-save", action="store_true", help="do not copy findings into tests/fuzz_corpus")
    parser.add_argument("--seed", type=int, help="libFuzzer's random seed (default: a fresh one per run)")
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.target == "all" else [n.strip() for n in args.target.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="arx-fuzz-") as tmp:
        for name in names:
            result = fuzz_target(TARGETS[name], args.seconds, not args.no_line_coverage, Path(tmp), not args.no_save, args.seed)
            results.append(result)
            print(f"{name}: {result.inputs} inputs, cov {result.edges} ft {result.features}, {len(result.findings)} findings", flush=True)
    print(table(results), flush=True)
    for result in results:
        if result.inputs == 0:
            print(f"\n{result.target}: the fuzzer did not run (exit {result.exit_code}):\n{result.log_tail}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"seconds_per_target": args.seconds, "targets": [asdict(r) for r in results]}, indent=2))
    failed = any(r.new_findings or r.inputs == 0 for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

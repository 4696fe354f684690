"""The report of ``tools/reproduce``: ``report.md`` and PNG plots, from its results alone.

``python -m tools.report DIR`` redraws them from ``DIR/results.json``. The paper's figures
beside ours are the ones in shared/reference/arrakis.md (Peter et al., OSDI 2014); only
ratios compare across machines, so the tables put the ratios side by side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from tools import costs  # noqa: E402

# One colour per target in every plot; the smoke test looks for these in the PNGs.
COLOURS = {"vnic": "#d62728", "linux": "#1f77b4", "real": "#2ca02c"}
LABELS = {"vnic": "vnic (bypass)", "linux": "linux backend", "real": "redis-server 7"}
# The paper's numbers (Arrakis against Linux on its testbed), as ratios Arrakis/Linux.
PAPER: dict[str, Any] = {
    "get_throughput": (143_000, 250_000),  # ops/s, Linux then Arrakis
    "durable_throughput": (7_000, 63_000),
    "get_latency_ratio": 0.35,  # "GET latency down 65%"
    "durable_latency_ratio": 0.19,  # "latency down 81%"
    "udp_linux_us_per_packet": 3.36,  # 70% of it in the network stack
    "redis_read_us": 8.7,
    "redis_write_us": 163.0,
}
PLOTS = ("fig3_ccdf.png", "throughput.png", "cost_breakdown.png", "isolation.png", "scaling.png")
SCALING_LABELS = {"vnic": "vnic (bypass), --workers N", "linux": "linux backend, SO_REUSEPORT",
                  "real": "memcached -t N"}
PAPER_SCALING = 3.0  # memcached on Arrakis: linear with cores, to 3x throughput


def _num(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ccdf(latency: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Steps of the CCDF, from 1.0 at the fastest request; the last point (0.0) cannot be on a log axis."""
    total = latency["total"]
    recorded = latency["points_us_count"]
    points = [(recorded[0][0], 1.0)] if recorded else []
    points += [(value, 1.0 - count / total) for value, count in recorded if count < total]
    return [p[0] for p in points], [p[1] for p in points]


def plot_ccdf(results: dict[str, Any], path: Path) -> bool:
    """Fig. 3: the CCDF of read-hit and durable-write latency, log axes as in the paper."""
    panels = [("redis_get", "GET (read hit), 1 client"), ("durable_set", "durable SET, 1 client")]
    panels = [(name, title) for name, title in panels if results["experiments"].get(name, {}).get("status") == "ok"]
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for axis, (name, title) in zip(axes[0], panels):
        for target, colour in COLOURS.items():
            run = results["experiments"][name].get(target)
            if run is None:
                continue
            xs, ys = _ccdf(run["c1"]["latency"])
            axis.step(xs, ys, where="post", color=colour, label=LABELS[target], linewidth=1.6)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: the minor ones collide
        axis.set_xlabel("latency (µs)")
        axis.set_ylabel("fraction of requests slower (CCDF)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_throughput(results: dict[str, Any], path: Path) -> bool:
    """Throughput with 50 clients, each bar as a multiple of the linux backend, the paper's beside."""
    groups = [("redis_get", "GET", PAPER["get_throughput"]), ("durable_set", "durable SET", PAPER["durable_throughput"])]
    groups = [g for g in groups if results["experiments"].get(g[0], {}).get("status") == "ok"]
    if not groups:
        return False
    figure, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for axis, (name, title, (paper_linux, paper_arrakis)) in zip(axes[0], groups):
        experiment = results["experiments"][name]
        linux = experiment["linux"]["c50"]["rps"]
        names, values, colours = [], [], []
        for target, colour in COLOURS.items():
            names.append(LABELS[target])
            values.append(experiment[target]["c50"]["rps"] / linux)
            colours.append(colour)
        names.append("paper: Arrakis")
        values.append(paper_arrakis / paper_linux)
        colours.append("#7f7f7f")
        bars = axis.bar(names, values, color=colours)
        labels = [f"{experiment[target]['c50']['rps']:,.0f}/s" for target in COLOURS] + [f"{paper_arrakis:,}/s"]
        for bar, text in zip(bars, labels):
            axis.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                          fontsize=8)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_ylabel("throughput / linux backend (paper: / Linux)")
        axis.set_title(f"{title}, 50 clients")
        axis.tick_params(axis="x", labelrotation=15)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# The parts of the cost breakdown (tools/costs.py), bottom to top: (key, legend label, colour).
# "user" appears only where the server's user time could not be split (redis-server has no
# Python; or py-spy was missing or failed): then it stands for app, stack and runtime together.
COST_PARTS = (("app", "app logic", "#ff7f0e"), ("stack", "libOS network/storage stack", "#d62728"),
              ("runtime", "runtime (queue API, event loop, stdlib)", "#9467bd"),
              ("user", "user time, not split (no Python or no samples)", "#8c564b"),
              ("kernel", "kernel and system calls", "#7f7f7f"), ("device_host", "device host", "#1f77b4"))
_COST_EXPERIMENTS = (("redis_get", "GET", "c50"), ("durable_set", "durable SET", "c50"), ("udp_echo", "UDP echo", None))


def cost_breakdown(run: dict[str, Any]) -> dict[str, float]:
    """A run's breakdown; for results written before there was one, the plain user/kernel split."""
    recorded = run.get("cpu_breakdown_us")
    return dict(recorded) if recorded else costs.breakdown(run["cpu_us_per_request"], None)


def _cost_rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(experiment title, target, run) of every throughput step that has a CPU measurement."""
    rows = []
    for name, title, key in _COST_EXPERIMENTS:
        experiment = results["experiments"].get(name, {})
        if experiment.get("status") != "ok":
            continue
        for target in COLOURS:
            run = experiment.get(target)
            if run is not None:
                rows.append((title, target, run[key] if key else run))
    return rows


def plot_cost(results: dict[str, Any], path: Path) -> bool:
    """CPU time per request as stacked bars, the targets of one experiment side by side."""
    rows = _cost_rows(results)
    if not rows:
        return False
    figure, axis = plt.subplots(figsize=(max(7.0, 1.2 * len(rows)), 5.0))
    # A gap between experiments: x advances one per bar and one more at each new experiment.
    xs, x, previous = [], 0.0, rows[0][0]
    for title, _, _ in rows:
        x += 1.0 if title == previous else 1.8
        previous = title
        xs.append(x)
    parts = [cost_breakdown(run) for _, _, run in rows]
    bottoms = [0.0] * len(rows)
    for key, label, colour in COST_PARTS:
        heights = [part.get(key, 0.0) for part in parts]
        if any(heights):
            axis.bar(xs, heights, bottom=bottoms, color=colour, label=label, width=0.8)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
    real = "redis-server\n(user/kernel only)"  # no Python in it: its user time cannot be split
    names = [f"{title}\n{real if target == 'real' else target}" for title, target, _ in rows]
    axis.set_xticks(xs, names, fontsize=8)
    axis.set_ylabel("CPU µs per request")
    axis.set_title("where a request's CPU time goes (GET, SET: 50 clients; UDP: 1 in flight)", fontsize=10)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


_PHASE_LABELS = {"alone": "alone", "flood": "neighbour flooded", "limited": "flooded, rate specifier"}
_PHASE_TICKS = {"alone": "alone", "flood": "flood", "limited": "flood,\nlimited"}
_PHASE_SHADES = {"alone": 1.0, "flood": 0.55, "limited": 0.8}


def plot_isolation(results: dict[str, Any], path: Path) -> bool:
    """The victim's p50 and p99 in each phase, per backend: the noisy-neighbour plot."""
    experiment = results["experiments"].get("isolation", {})
    if experiment.get("status") != "ok":
        return False
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.2), squeeze=False)
    for axis, metric in zip(axes[0], ("p50_us", "p99_us")):
        positions, heights, colours = [], [], []
        for group, backend in enumerate(("vnic", "linux")):
            for offset, phase in enumerate(_PHASE_LABELS):
                positions.append(group * 4 + offset)
                heights.append(experiment[backend][phase]["victim"][metric])
                base = mcolors.to_rgb(COLOURS[backend])
                shade = _PHASE_SHADES[phase]
                colours.append(tuple(1 - (1 - c) * shade for c in base))
        axis.bar(positions, heights, color=colours, edgecolor=[COLOURS[b] for b in ("vnic", "linux") for _ in _PHASE_LABELS])
        axis.set_xticks(positions, [f"{backend}\n{_PHASE_TICKS[phase]}" for backend in ("vnic", "linux")
                                    for phase in _PHASE_LABELS], fontsize=8)
        # A flood moves the tail by one to two orders of magnitude: on a linear axis the
        # other bars, the ones the goal is about, would be too short to read.
        axis.set_yscale("log")
        axis.set_ylabel(f"victim GET {metric[:3]} (µs, log scale), 1 client")
        axis.set_title(f"victim's {metric[:3]}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_scaling(results: dict[str, Any], path: Path) -> bool:
    """memcaslap throughput over workers, one curve per target, with the linear ideal from
    each target's one-worker point (the paper's memcached scaled linearly)."""
    experiment = results["experiments"].get("memcached_scaling", {})
    if experiment.get("status") != "ok":
        return False
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    workers = experiment["workers"]
    for target, colour in COLOURS.items():
        rows = experiment.get(target)
        if not rows:
            continue
        xs = [row["workers"] for row in rows]
        ys = [row["tps"] for row in rows]
        axis.plot(xs, ys, color=colour, marker="o", linewidth=1.8, label=SCALING_LABELS[target])
        axis.plot(xs, [ys[0] * x for x in xs], color=colour, linestyle=":", linewidth=1.0)
    axis.set_xticks(workers)
    axis.set_xlabel("workers (server processes or threads)")
    axis.set_ylabel("memcaslap throughput (ops/s, TCP, 16 connections)")
    axis.set_ylim(bottom=0)
    axis.set_title("memcached scaling (dotted: linear from 1 worker)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _scaling_markdown(experiment: dict[str, Any], cpus: int | None) -> list[str]:
    workers = experiment["workers"]
    lines = ["## memcached scaling: memcaslap throughput over workers (ops/s)", "",
             f"memcaslap over TCP, {experiment['connections']} connections, {experiment['seconds']} s per point, client "
             f"on CPU {experiment['client_cpu']}. Server CPUs per worker count: "
             + ", ".join(f"{n}: {experiment['server_cpus'][str(n)]}" for n in workers) + ". "
             f"The paper's memcached scaled linearly, to {PAPER_SCALING:.0f}× throughput."
             + (f" On this {cpus}-CPU machine the workers share CPUs with the client and the device hosts." if
                cpus is not None and cpus - 1 < workers[-1] else ""), "",
             "| workers | " + " | ".join(SCALING_LABELS[t] for t in COLOURS) + " |", "|---|" + "---|" * len(COLOURS)]
    for index, count in enumerate(workers):
        cells = [_num(experiment[t][index]["tps"]) if experiment.get(t) else "–" for t in COLOURS]
        lines.append(f"| {count} | " + " | ".join(cells) + " |")
    speedup = experiment.get("speedup", {})
    lines.append(f"| speed-up {workers[-1]}/1 | " + " | ".join(_num(speedup.get(t), 2) for t in COLOURS) + " |")
    lines += ["", "![scaling](scaling.png)", ""]
    return lines


def _cpu_total(cpu: dict[str, dict[str, float]]) -> float:
    return sum(part["user"] + part["kernel"] for part in cpu.values())


def _cost_markdown(results: dict[str, Any]) -> list[str]:
    """The cost breakdown table: the numbers of cost_breakdown.png and how they were measured."""
    lines = ["## CPU time per request (µs), measured", "",
             "Each process's user and kernel time over the step, from /proc/PID/stat, divided by the requests. "
             "The server's user time is split into app logic, libOS stack and runtime in proportion to py-spy "
             f"samples of its Python stacks taken during the step ({costs.RATE}/s, each sample by the file of its "
             "innermost frame; `tools/costs.py`); its kernel time is *kernel and system calls*; *device host* is the "
             "VNIC and VSIC host processes' whole CPU time. Where no samples could be taken (redis-server has no "
             "Python) the server's user time stays one part, *user, not split*. "
             f"The paper: Linux spends {PAPER['udp_linux_us_per_packet']} µs per UDP echo packet, 70% of it in the "
             f"network stack; a Redis read {PAPER['redis_read_us']} µs and a durable write {PAPER['redis_write_us']} µs.",
             "", "| | app logic | libOS stack | runtime | user, not split | kernel and system calls | device host | "
             "total | py-spy samples |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for title, target, run in _cost_rows(results):
        parts = cost_breakdown(run)
        cells = " | ".join(f"{parts[key]:.1f}" if key in parts else "–" for key, _, _ in COST_PARTS)
        samples = run.get("cpu_samples")
        count = str(sum(samples.values())) if samples else "–"
        lines.append(f"| {title} {target} | {cells} | {_cpu_total(run['cpu_us_per_request']):.1f} | {count} |")
        method = run.get("cpu_breakdown_method", "")
        if method.startswith("user/kernel only") and target != "real":
            notes.append(f"* {title} {target}: {method}")
    if notes:
        lines += ["", "Not split:", *notes]
    return lines


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    pin = results["pinning"]
    lines = [
        "# The paper's evaluation, reproduced",
        "",
        f"`{results['command']}`, {results['started']} to {results.get('finished', '?')} ({results['mode']} run"
        + ("; quick runs are smoke runs, not measurements" if results["mode"] == "quick" else "") + ").",
        f"Machine: {machine.get('cpus')} CPUs ({machine.get('cpu_model', '?')}), Linux {machine.get('kernel')}, "
        f"Python {machine.get('python')}. Servers pinned to CPU {pin['servers']}; clients and device hosts to "
        f"CPU {pin['clients']}.",
        "",
        "The paper measured Arrakis against Linux on its own testbed. Only the ratios compare.",
        "",
    ]
    experiments = results["experiments"]
    get, durable, udp = (experiments.get(n, {}) for n in ("redis_get", "durable_set", "udp_echo"))
    if get.get("status") == "ok" or durable.get("status") == "ok":
        lines += ["## Throughput, 50 clients (requests/s)", "",
                  "| | vnic | linux | redis-server | vnic/linux | paper Arrakis/Linux |", "|---|---|---|---|---|---|"]
        for experiment, label, (paper_linux, paper_arrakis) in (
            (get, "GET", PAPER["get_throughput"]), (durable, "durable SET", PAPER["durable_throughput"])
        ):
            if experiment.get("status") != "ok":
                continue
            rps = {t: experiment[t]["c50"]["rps"] for t in COLOURS}
            lines.append(f"| {label} | {_num(rps['vnic'])} | {_num(rps['linux'])} | {_num(rps['real'])} | "
                         f"{_num(_ratio(rps['vnic'], rps['linux']), 2)} | {paper_arrakis / paper_linux:.2f} "
                         f"({paper_linux:,} → {paper_arrakis:,}) |")
        lines += ["", "## Latency, 1 client (µs), Fig. 3", "", "![Fig. 3](fig3_ccdf.png)", "",
                  "| | vnic p50 | linux p50 | redis-server p50 | vnic p99 | linux p99 | vnic/linux p50 | paper |",
                  "|---|---|---|---|---|---|---|---|"]
        for experiment, label, paper in ((get, "GET", PAPER["get_latency_ratio"]),
                                         (durable, "durable SET", PAPER["durable_latency_ratio"])):
            if experiment.get("status") != "ok":
                continue
            c1 = {t: experiment[t]["c1"] for t in COLOURS}
            lines.append(f"| {label} | {_num(c1['vnic']['p50_us'])} | {_num(c1['linux']['p50_us'])} | "
                         f"{_num(c1['real']['p50_us'])} | {_num(c1['vnic']['p99_us'])} | {_num(c1['linux']['p99_us'])} | "
                         f"{_num(_ratio(c1['vnic']['p50_us'], c1['linux']['p50_us']), 2)} | {paper:.2f} |")
        lines += ["", "![throughput](throughput.png)", ""]
    lines += _cost_markdown(results)
    lines += ["", "![cost](cost_breakdown.png)", ""]
    if udp.get("status") == "ok":
        lines += ["## UDP echo, one request in flight (µs)", "", "| | p50 | p99 | samples |", "|---|---|---|---|"]
        for target in ("vnic", "linux"):
            lines.append(f"| {target} | {_num(udp[target]['p50_us'], 1)} | {_num(udp[target]['p99_us'], 1)} | "
                         f"{udp[target]['samples']} |")
        lines.append("")
    isolation = experiments.get("isolation", {})
    if isolation.get("status") == "ok":
        lines += ["## Isolation: the victim's GET latency (µs, 1 client) beside a flooded neighbour", "",
                  f"The neighbour is flooded with {isolation['datagram_bytes']}-byte datagrams; its limit is a tenth of "
                  "what the flood offered. Goal: with the limit, the victim's p99 within 1.2× of its p99 alone.", "",
                  "| | alone p50 | alone p99 | flooded p50 | flooded p99 | limited p50 | limited p99 | "
                  "limited p99 / alone | offered Mbit/s | limit Mbit/s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for backend in ("vnic", "linux"):
            row = isolation[backend]
            cells = [f"{_num(row[phase]['victim'][m])}" for phase in _PHASE_LABELS for m in ("p50_us", "p99_us")]
            lines.append(f"| {backend} | " + " | ".join(cells) + f" | {row['p99_over_alone']['limited']:.2f} | "
                         f"{row['offered_bps'] / 1e6:.0f} | {row['limit_bps'] / 1e6:.1f} |")
        lines += ["", "![isolation](isolation.png)", ""]
    scaling = experiments.get("memcached_scaling", {})
    if scaling.get("status") == "ok":
        lines += _scaling_markdown(scaling, machine.get("cpus"))
    not_run = [(name, e["why"]) for name, e in experiments.items() if e.get("status") != "ok"]
    if not_run:
        lines += ["## Not run", ""] + [f"* `{name}`: {why}" for name, why in not_run] + [""]
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """report.md and every plot there is data for; returns the paths written."""
    written = []
    for name, plot in zip(PLOTS, (plot_ccdf, plot_throughput, plot_cost, plot_isolation, plot_scaling)):
        if plot(results, out / name):
            written.append(out / name)
    (out / "report.md").write_text(markdown(results))
    written.append(out / "report.md")
    return written


if __name__ == "__main__":
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "report")
    for path in write(json.loads((directory / "results.json").read_text()), directory):
        print(path)

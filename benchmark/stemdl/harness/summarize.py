"""The result summarizer: strong- and weak-scaling tables and plots from a submission's MLPerf logs.

    stemdl summarize MyOrg                     # MyOrg/results/<system>/{strong,weak}/<benchmark>/result_<i>.txt
    stemdl summarize runs/ --out /tmp/sum      # or a plain folder of result_<i>.txt (strong scaling)
    stemdl summarize MyOrg --division open     # check every log against the open rules

Any registered benchmark: each log names its own (submission_benchmark), and the workload gives the eval
key, the target metric's name and its direction. Every log is checked first (`check_log`); one that fails
is listed with its first reason and left out (so is an entry that is no file to read: a folder, a dangling
link), except a closed log whose only fault is that it never reached the target: that is a run that did
not converge, and it counts as one.

Strong scaling: the runs of one (benchmark, system, number_of_nodes, world size) form a scale; its score
is the MLPerf HPC olympic mean of the time to train (run_stop - run_start): with 5 runs or more the fastest
and the slowest are dropped and the rest averaged, a run that did not converge counts as infinitely slow,
so at most one may fail and it is the one dropped; otherwise the scale is INVALID. Fewer than 5 runs give
the plain mean, flagged. Speedup and parallel efficiency are against the smallest scale of the benchmark,
counted in ranks (world size). Weak scaling: the M runs under one system's weak/ folder are one group; its
time is max(run_stop) - min(run_start) and its throughput the samples all M models trained over that time.

Writes OUT/summary.md, summary.csv, summary.json and three PNGs (time to target, parallel efficiency,
epochs to target against ranks), each atomically, and prints the Markdown to stdout.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from stemdl.harness import files, mlperf
from stemdl.harness.compliance import UnreadableLog, check_log, parse_log
from stemdl.harness.errors import StemdlError

MIN_RUNS = 5  # MLPerf HPC strong scaling: at least 5 runs, the fastest and the slowest dropped
SCALINGS = ("strong", "weak")
_RESULT = re.compile(r"result_(\d+)\.txt")


@dataclass(frozen=True)
class Run:
    """What the summary needs from one log that passed the compliance check. Times in ms since the epoch."""
    path: str
    benchmark: str
    system: str
    scaling: str
    number_of_nodes: int
    accelerators_per_node: int
    world_size: int
    run_start_ms: float
    run_stop_ms: float
    status: str
    epochs: int
    final_metric: float | None  # the target metric's last logged value
    best_metric: float | None  # its best, by the benchmark's direction
    train_samples: int
    energy_j: float | None

    @property
    def converged(self) -> bool:
        return self.status == mlperf.SUCCESS

    @property
    def time_s(self) -> float:
        return (self.run_stop_ms - self.run_start_ms) / 1000.0

    @property
    def samples_per_s(self) -> float | None:
        return self.train_samples * self.epochs / self.time_s if self.time_s > 0 else None


@dataclass
class Score:
    """The olympic mean (or the plain mean, flagged) of a scale's times to train; `time_s` None if INVALID."""
    time_s: float | None
    valid: bool
    note: str = ""


@dataclass
class StrongRow:
    benchmark: str
    system: str
    number_of_nodes: int
    world_size: int
    runs: int
    converged: int
    time_to_target_s: float | None
    valid: bool
    note: str
    min_s: float | None
    median_s: float | None
    max_s: float | None
    epochs_to_target: float | None
    best_metric: float | None  # the best value any run of the scale reached
    samples_per_s: float | None
    energy_to_target_j: float | None
    speedup: float | None = None
    efficiency: float | None = None


@dataclass
class WeakRow:
    benchmark: str
    system: str
    models: int
    number_of_nodes: int  # per model (the scale S); the largest if the models differ
    world_size: int       # per model
    converged: int
    time_s: float
    samples: int
    samples_per_s: float | None
    energy_j: float | None


@dataclass
class Summary:
    strong: list[StrongRow] = field(default_factory=list)
    weak: list[WeakRow] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)  # {"path", "reason"}
    runs: list[Run] = field(default_factory=list)
    titles: dict = field(default_factory=dict)  # benchmark -> its target metric as people write it


# -- finding and reading the logs

def find_logs(org: Path) -> list[tuple[Path, str, str]]:
    """(log, system, scaling) for every result_<i>.txt of the submission layout, or of a plain folder."""
    org = Path(org)
    if not org.is_dir():
        raise StemdlError(f"{org}: no such folder (want ORG/results/<system>/strong/<benchmark>/result_<i>.txt)")
    found = [(p, p.parents[2].name, scaling)
             for scaling in SCALINGS for p in org.glob(f"results/*/{scaling}/*/result_*.txt")]
    if not found:  # a plain folder of logs: one system, strong scaling
        found = [(p, org.resolve().name, "strong") for p in org.glob("result_*.txt")]
    found = [f for f in found if _RESULT.fullmatch(f[0].name)]
    if not found:
        raise StemdlError(f"{org}: no result_<i>.txt under results/*/strong|weak/<benchmark>/ nor in the folder")
    return sorted(found, key=lambda f: (f[2], f[1], str(f[0].parent), int(_RESULT.fullmatch(f[0].name).group(1))))


def read_run(path: Path, system: str, scaling: str, workload) -> Run:
    """The figures of one log that passed the check (so every key the rules require is there)."""
    loglines, _ = parse_log(path)
    last = {ll.key: ll for ll in loglines}  # the last line of each key

    def value(key, default=None):
        return last[key].value["value"] if key in last else default

    epochs = [ll.value["metadata"].get(mlperf.EPOCH_NUM) for ll in loglines if ll.key == mlperf.EPOCH_STOP]
    evals = [ll.value["value"] for ll in loglines if ll.key == workload.eval_key]
    nodes = int(value(mlperf.NUMBER_OF_NODES, 1))
    accelerators = int(value(mlperf.ACCELERATORS_PER_NODE, 0))
    return Run(
        path=str(path), benchmark=workload.name, system=system, scaling=scaling, number_of_nodes=nodes,
        accelerators_per_node=accelerators, world_size=_world_size(path, nodes, accelerators),
        run_start_ms=last[mlperf.RUN_START].timestamp, run_stop_ms=last[mlperf.RUN_STOP].timestamp,
        status=last[mlperf.RUN_STOP].value["metadata"].get(mlperf.STATUS, ""),
        epochs=int(max(epochs, default=0) or 0), final_metric=evals[-1] if evals else None,
        best_metric=_best(evals, workload.direction), train_samples=int(value(mlperf.TRAIN_SAMPLES, 0)),
        energy_j=_energy(loglines),
    )


def _best(values: list, direction: str):
    values = [v for v in values if v is not None]
    return (max if direction == "max" else min)(values) if values else None


def _world_size(log: Path, nodes: int, accelerators: int) -> int:
    # The log has nodes and accelerators per node; a CPU run logs 0 accelerators, and its ranks are only in
    # the metrics file the run writes beside the log. Without either: one rank per node.
    if accelerators > 0:
        return nodes * accelerators
    metrics = log.with_name(log.stem + ".metrics.json")
    if not metrics.is_file():  # nor a FIFO, which would block the read
        return nodes
    try:
        return int(json.loads(metrics.read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return nodes


def _energy(loglines) -> float | None:
    # No stemdl key is fixed yet: any numeric key naming energy (gpu_energy, one line per node, J). The last
    # value per (key, node) is that node's total; the run's energy is the sum over nodes.
    per_node = {}
    for ll in loglines:
        v, meta = ll.value.get("value"), ll.value.get("metadata") or {}
        if "energy" in ll.key and isinstance(v, (int, float)) and not isinstance(v, bool):
            per_node[(ll.key, meta.get("node", meta.get("host")))] = float(v)
    return sum(per_node.values()) if per_node else None


def collect(org: Path, registry, division: str | None = None) -> tuple[list[Run], list[dict], dict]:
    """(runs that count, [{"path", "reason"}] of those that do not, {benchmark: direction}). A closed log
    whose one fault is that it never reached the target counts, as a run that did not converge."""
    runs, excluded, directions = [], [], {}
    for path, system, scaling in find_logs(org):
        try:
            verdict = check_log(path, registry, division)
        except UnreadableLog as exc:  # one bad entry is listed, not the end of the report
            excluded.append({"path": str(path), "reason": f"cannot read the log ({exc.reason})"})
            continue
        if verdict.passed or verdict.only_target_missed:
            workload = registry[verdict.benchmark]
            runs.append(read_run(path, system, scaling, workload))
            directions[workload.name] = (workload.direction, workload.target_title)
        else:
            excluded.append({"path": str(path), "reason": _one_line(verdict.problems[0])})
    return runs, excluded, directions


def _one_line(message: str) -> str:
    # The checker's message, less the quoted log line and the rule state: what failed, and the test.
    keep = [ln.strip() for ln in message.splitlines() if not ln.strip().startswith((":::MLLOG", "state:"))]
    return "; ".join(ln for ln in keep if ln)


# -- the arithmetic

def olympic_mean(times: list[float], converged: list[bool]) -> Score:
    """The MLPerf HPC score of one scale's runs (times in s; a run that did not converge counts as inf)."""
    n, failed = len(times), converged.count(False)
    if n == 0:
        return Score(None, False, "no runs")
    if n < MIN_RUNS:
        ok = [t for t, c in zip(times, converged) if c]
        note = f"not enough runs for an MLPerf result ({n} < {MIN_RUNS})"
        if failed:
            note += f"; {failed} did not converge, left out of the mean"
        return Score(statistics.fmean(ok) if ok else None, False, note)
    if failed > 1:
        return Score(None, False, f"INVALID: {failed} of {n} runs did not converge (at most 1, dropped as the worst)")
    ranked = sorted(t if c else math.inf for t, c in zip(times, converged))
    kept = ranked[1:-1]
    return Score(statistics.fmean(kept), True, f"olympic mean of {len(kept)} of {n} runs")


def strong_rows(runs: list[Run], directions: dict | None = None) -> list[StrongRow]:
    """One row per scale, speedup and efficiency against each benchmark's smallest scale with a time."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.benchmark, r.system, r.number_of_nodes, r.world_size), []).append(r)
    rows = [_strong_row(key, group, (directions or {}).get(key[0], ("max",))[0]) for key, group in groups.items()]
    rows.sort(key=lambda r: (r.benchmark, r.world_size, r.number_of_nodes, r.system))
    for benchmark in dict.fromkeys(r.benchmark for r in rows):
        mine = [r for r in rows if r.benchmark == benchmark]
        base = next((r for r in mine if r.time_to_target_s), None)  # the smallest scale with a time
        for r in mine:
            if base and r.time_to_target_s:
                r.speedup = base.time_to_target_s / r.time_to_target_s
                r.efficiency = r.speedup / (r.world_size / base.world_size)
    return rows


def _strong_row(key: tuple, group: list[Run], direction: str) -> StrongRow:
    score = olympic_mean([r.time_s for r in group], [r.converged for r in group])
    ok = [r for r in group if r.converged]
    times = [r.time_s for r in ok]
    energies = [r.energy_j for r in ok if r.energy_j is not None]
    speeds = [s for s in (r.samples_per_s for r in group) if s is not None]
    return StrongRow(
        benchmark=key[0], system=key[1], number_of_nodes=key[2], world_size=key[3], runs=len(group),
        converged=len(ok),
        time_to_target_s=score.time_s, valid=score.valid, note=score.note,
        min_s=min(times, default=None), median_s=statistics.median(times) if times else None,
        max_s=max(times, default=None),
        epochs_to_target=statistics.fmean(r.epochs for r in ok) if ok else None,
        best_metric=_best([r.best_metric for r in group], direction),
        samples_per_s=statistics.fmean(speeds) if speeds else None,
        energy_to_target_j=statistics.fmean(energies) if energies else None,
    )


def weak_rows(runs: list[Run]) -> list[WeakRow]:
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.benchmark, r.system), []).append(r)
    rows = []
    for (benchmark, system), group in sorted(groups.items()):
        time_s = (max(r.run_stop_ms for r in group) - min(r.run_start_ms for r in group)) / 1000.0
        samples = sum(r.train_samples * r.epochs for r in group)
        energies = [r.energy_j for r in group]
        rows.append(WeakRow(
            benchmark=benchmark, system=system, models=len(group), number_of_nodes=max(r.number_of_nodes for r in group),
            world_size=max(r.world_size for r in group), converged=sum(r.converged for r in group),
            time_s=time_s, samples=samples, samples_per_s=samples / time_s if time_s > 0 else None,
            energy_j=sum(energies) if energies and None not in energies else None,
        ))
    return rows


def summarize(org: Path, registry, division: str | None = None) -> Summary:
    runs, excluded, directions = collect(Path(org), registry, division)
    return Summary(strong=strong_rows([r for r in runs if r.scaling == "strong"], directions),
                   weak=weak_rows([r for r in runs if r.scaling == "weak"]), excluded=excluded, runs=runs,
                   titles={name: title for name, (_, title) in directions.items()})


# -- the outputs

STRONG_COLUMNS = [  # (header, attribute, format)
    ("system", "system", "{}"), ("nodes", "number_of_nodes", "{}"), ("ranks", "world_size", "{}"),
    ("runs", "runs", "{}"), ("converged", "converged", "{}"), ("time to target (s)", "time_to_target_s", "{:.3f}"),
    ("min (s)", "min_s", "{:.3f}"), ("median (s)", "median_s", "{:.3f}"), ("max (s)", "max_s", "{:.3f}"),
    ("epochs to target", "epochs_to_target", "{:.2f}"), ("best metric", "best_metric", "{:.4f}"),
    ("samples/s", "samples_per_s", "{:.1f}"), ("speedup", "speedup", "{:.2f}"), ("efficiency", "efficiency", "{:.2f}"),
    ("energy to target (J)", "energy_to_target_j", "{:.1f}"), ("note", "note", "{}"),
]
WEAK_COLUMNS = [
    ("system", "system", "{}"), ("models", "models", "{}"), ("nodes/model", "number_of_nodes", "{}"),
    ("ranks/model", "world_size", "{}"), ("converged", "converged", "{}"), ("time (s)", "time_s", "{:.3f}"),
    ("samples", "samples", "{}"), ("samples/s", "samples_per_s", "{:.1f}"), ("energy (J)", "energy_j", "{:.1f}"),
]


def _cell(row, attr: str, fmt: str) -> str:
    v = getattr(row, attr)
    return "n/a" if v is None else fmt.format(v)


def _table(rows, columns) -> list[str]:
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, a, f).replace("|", "/") for _, a, f in columns) + " |" for r in rows]
    return lines


def to_markdown(s: Summary) -> str:
    out = ["# stemdl results"]
    benchmarks = list(dict.fromkeys([r.benchmark for r in s.strong] + [r.benchmark for r in s.weak]))
    for name in benchmarks:
        strong = [r for r in s.strong if r.benchmark == name]
        weak = [r for r in s.weak if r.benchmark == name]
        out += ["", f"## {name}: strong scaling (time to the target {s.titles.get(name, 'metric')})", ""]
        out += _table(strong, STRONG_COLUMNS) if strong else ["(no strong-scaling logs)"]
        if weak:
            out += ["", f"## {name}: weak scaling (M models at once)", "", *_table(weak, WEAK_COLUMNS)]
    if not benchmarks:
        out += ["", "(no log passed the compliance check)"]
    if s.excluded:
        out += ["", "## Excluded logs (unreadable, or failed the compliance check)", ""]
        out += [f"- `{e['path']}`: {e['reason']}" for e in s.excluded]
    return "\n".join(out) + "\n"


def to_csv(s: Summary) -> str:
    # One file, both tables: a scaling column, and the union of the columns (empty where a table has none).
    headers = ["scaling"] + list(dict.fromkeys(f.name for cls in (StrongRow, WeakRow) for f in fields(cls)))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, headers, lineterminator="\n")
    writer.writeheader()
    for scaling, rows in (("strong", s.strong), ("weak", s.weak)):
        for r in rows:
            writer.writerow({"scaling": scaling, **{k: "" if v is None else v for k, v in asdict(r).items()}})
    return buf.getvalue()


def to_json(s: Summary) -> str:
    runs = [{**asdict(r), "time_s": r.time_s, "converged": r.converged} for r in s.runs]
    doc = {"strong": [asdict(r) for r in s.strong], "weak": [asdict(r) for r in s.weak],
           "excluded": s.excluded, "runs": runs}
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"


def plots(s: Summary) -> dict[str, bytes]:
    """name -> PNG bytes: time to F1, parallel efficiency and epochs to target against ranks."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # not pyplot: no global figure state

    specs = [("time_to_target.png", "time_to_target_s", "time to target (s)"),
             ("efficiency.png", "efficiency", "parallel efficiency"),
             ("epochs_to_target.png", "epochs_to_target", "epochs to target")]
    out = {}
    for name, attr, label in specs:
        fig = Figure(figsize=(5, 3.5))
        ax = fig.add_subplot()
        for benchmark in dict.fromkeys(r.benchmark for r in s.strong):
            points = [(r.world_size, getattr(r, attr)) for r in s.strong
                      if r.benchmark == benchmark and getattr(r, attr) is not None]
            if points:
                ax.plot(*zip(*points), "o-", label=benchmark)
        if s.strong:
            ax.legend()
        ax.set(xlabel="ranks (world size)", ylabel=label, title=f"strong scaling: {label}")
        ax.grid(True, alpha=0.3)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        out[name] = buf.getvalue()
    return out


def write_outputs(s: Summary, out: Path) -> dict[str, Path]:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        outputs = {"summary.md": to_markdown(s), "summary.csv": to_csv(s), "summary.json": to_json(s), **plots(s)}
        for name, data in outputs.items():
            files.write_atomic(out / name, data)
    except OSError as exc:
        raise StemdlError(f"{out}: cannot write the summary ({exc.strerror or exc})") from None
    return {name: out / name for name in outputs}


# -- the command

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("org", metavar="ORG", type=Path,
                        help="a submission folder (ORG/results/<system>/{strong,weak}/<benchmark>/) or a folder of logs")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: ORG/summary)")
    parser.add_argument("--division", choices=mlperf.DIVISIONS, default=None,
                        help="check every log against this division's rules (default: the one each log states)")


def run(args: argparse.Namespace, registry) -> int:
    s = summarize(args.org, registry, args.division)
    write_outputs(s, args.out if args.out is not None else Path(args.org) / "summary")
    print(to_markdown(s), end="")
    return 0

"""`stemdl ablate`: the data challenge's questions (2) and (3) as measured ablations on one data set.

    stemdl ablate imbalance --out results/imbalance            # losses, samplers, a seed ensemble
    stemdl ablate multitask --out results/multitask            # extra heads, fixed and learned weights
    stemdl ablate imbalance --methods ce,focal --seeds 0,1 --set epochs=20 --data /lustre/stemdl-shards
    stemdl ablate dynamical --out results/dynamical --data data/pairs --seeds 0,1,2   # issue 14

Every method is a set of config overrides on one base (`--config`, the `ablation` preset by default: the
imbalanced synthetic set with the public class mix, the small CNN, 12 epochs, no stop at the target), run
by the harness's runner in this process, so each leaves its MLLOG and metrics in OUT/runs/<method>/seed_<s>/.
The table (OUT/ablation.md, .json) gives, per method and averaged over the seeds: macro F1, weighted F1,
top-1 accuracy and the tail macro F1 (the mean F1 of the classes with fewer training samples than the
median class) of the last evaluation, and the minutes to the first evaluation at the target macro F1
where one reached it. The ensemble row averages the logits of the `ce` members (one per seed), so it
needs `ce` in the methods and is evaluated after them; with one seed it trains extra members.

The dynamical study asks what multislice patterns buy over kinematic ones on space groups that Friedel's
law puts in one diffraction class (the `pairs` synth preset): its --data folder holds `kinematic/` and
`multislice/`, one seed rendered both ways (`stemdl synth DATA/kinematic --preset pairs --physics
kinematic`, the same with multislice), and each is also trained with Friedel's law imposed on the
input (`friedel: average`): on the multislice patterns that isolates what the broken law itself is
worth, on the kinematic ones what the averaging does by itself (it also halves the noise, and removes
the asymmetry of mistilt); and with each pattern split into its symmetric and antisymmetric halves as
channels (`friedel: split`), which puts the difference between g and -g where a convolution sees it.
Two more rows need no training: one threshold on a sample's Friedel asymmetry (`spacegroup.friedel`),
fitted on train and scored on dev per pair, for each rendering: whether the broken law alone tells the
pair apart. Its table adds each pair's F1: the macro F1 of the pair's 2x2 block of the confusion matrix
(0.5 is chance). The method `kinematic_to_multislice` trains on the kinematic patterns, exactly as
`kinematic` does, keeps its final weights and scores them on the multislice validation split (its row;
the run's own log scores it on the kinematic one): how a model trained on the default synthetic
physics fares on dynamical patterns of the same crystals.

A method already finished in OUT (its metrics file is there) is not run again: an interrupted ablation
resumes where it stopped. Results are never overwritten; a new OUT starts afresh.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from stemdl.harness.errors import StemdlError

# name -> config overrides; the registry of each study (data, not code paths)
IMBALANCE = {
    "ce": {},
    "weighted": {"loss": "weighted"},
    "class_balanced": {"loss": "class_balanced"},
    "focal": {"loss": "focal"},
    "logit_adjusted": {"loss": "logit_adjusted"},
    "drw": {"loss": "drw"},
    "sampler_sqrt": {"sampler": "sqrt"},
    "sampler_balanced": {"sampler": "balanced"},
}
MULTITASK = {
    "space_group": {},
    "heads_fixed": {"tasks": "space_group,lattice,crystal_system,centring"},
    "heads_learned": {"tasks": "space_group,lattice,crystal_system,centring", "task_weighting": "learned"},
}
# "@data": the method's data, a subfolder of --data (the same crystals rendered each way)
DYNAMICAL = {
    "kinematic": {"@data": "kinematic"},
    "kinematic_friedel_average": {"@data": "kinematic", "friedel": "average"},
    "multislice": {"@data": "multislice"},
    "multislice_friedel_average": {"@data": "multislice", "friedel": "average"},
    "kinematic_friedel_split": {"@data": "kinematic", "friedel": "split"},
    "multislice_friedel_split": {"@data": "multislice", "friedel": "split"},
    "kinematic_to_multislice": {"@data": "kinematic", "@transfer": "multislice"},
}
# the dynamical study's pairs of space groups: one diffraction class each (issue 14)
PAIRS = ((1, 2), (33, 62), (216, 225))
PAIR_NAMES = {(1, 2): "P1/P-1", (33, 62): "Pna2_1/Pnma", (216, 225): "F-43m/Fm-3m"}
STUDIES = {"imbalance": IMBALANCE, "multitask": MULTITASK, "dynamical": DYNAMICAL}
ENSEMBLE = "ensemble"  # the imbalance study's extra row: logits of the ce members averaged


def _method_dir(out: Path, method: str, seed: int) -> Path:
    return out / "runs" / method / f"seed_{seed}"


def _model_dir(out: Path, method: str, seed: int) -> Path:
    """Where a run kept with `keep_model` writes its final weights (the ensemble's and transfer's input)."""
    return _method_dir(out, method, seed) / "model"


def run_method(out: Path, base: str, method: str, overrides: dict, seed: int, extra: dict, keep_model: bool) -> dict:
    """One benchmark run, or the metrics of the one that already finished in OUT."""
    from stemdl.harness.config import load_config
    from stemdl.harness.runner import execute
    from stemdl.workloads import REGISTRY
    from stemdl.workloads.spacegroup.workload import WORKLOAD

    folder = _method_dir(out, method, seed)
    done = sorted(folder.glob("result_*.metrics.json"))
    if not done:
        values = {**overrides, **extra, "harness.log_dir": str(folder), "harness.seed": seed}
        if keep_model:  # the ensemble needs the members' final weights
            values.update({"harness.checkpoint_dir": str(_model_dir(out, method, seed)), "harness.checkpoint_every": 1,
                           "harness.checkpoint_keep": 1})
        print(f"stemdl ablate: {method} (seed {seed})", file=sys.stderr, flush=True)
        status = execute(WORKLOAD, load_config(WORKLOAD, base, values), REGISTRY).exit_status
        if status != 0:
            raise StemdlError(f"stemdl ablate: the {method} run (seed {seed}) failed with exit status {status}; "
                              f"its log is in {folder}")
        done = sorted(folder.glob("result_*.metrics.json"))
    return json.loads(done[-1].read_text())


def tail_classes(counts: np.ndarray) -> np.ndarray:
    """Class indices with training samples but fewer than the median class (of the classes present)."""
    present = np.flatnonzero(counts)
    return present[counts[present] < np.median(counts[present])]


def pair_f1(final: dict, pair: tuple[int, int]) -> float:
    """The macro F1 of the 2x2 block of the final confusion matrix that two space groups span: how well
    the model tells them apart among the samples of the two it labels as one of the two (0.5: chance)."""
    from stemdl.harness.metrics import ClassScores, dense_confusion
    from stemdl.workloads.spacegroup.data.layout import class_index

    rows = class_index(pair)
    block = dense_confusion(final["confusion"], final["num_classes"])[np.ix_(rows, rows)]
    return ClassScores(block).macro_f1()


def class_top1(final: dict, pairs) -> float:
    """The fraction of the evaluated samples called one of the two groups of their own pair (their
    diffraction class): top-1 with each pair taken as one class."""
    from stemdl.harness.metrics import dense_confusion
    from stemdl.workloads.spacegroup.data.layout import class_index

    matrix = dense_confusion(final["confusion"], final["num_classes"])
    blocks = [class_index(pair) for pair in pairs]
    return float(sum(matrix[np.ix_(rows, rows)].sum() for rows in blocks) / matrix.sum())


def summarize_run(metrics: dict, tail: np.ndarray, target: float, pairs=()) -> dict:
    final = metrics["final"]
    tail_f1 = [row["f1"] for row in final["per_class"] if row["class"] in set(tail.tolist())]
    reached = [h for h in metrics["history"] if h["macro_f1"] >= target]
    row = {"macro_f1": final["macro_f1"], "weighted_f1": final["weighted_f1"], "top1": final["accuracy"],
           "tail_macro_f1": float(np.mean(tail_f1)) if tail_f1 else float("nan"),
           "minutes_to_target": reached[0]["elapsed_min"] if reached else None,
           "epochs_to_target": reached[0]["epoch"] if reached else None,
           "minutes": metrics["history"][-1]["elapsed_min"] if metrics["history"] else None}
    for pair in pairs:
        row[PAIR_NAMES[pair]] = pair_f1(final, pair)
    if pairs:
        row["class_top1"] = class_top1(final, pairs)
    for key in ("crystal_system_accuracy", "centring_accuracy", *(f"lattice_mae_{n}" for n in
                                                                  ("a", "b", "c", "alpha", "beta", "gamma"))):
        if metrics["history"] and key in metrics["history"][-1]:
            row[key] = metrics["history"][-1][key]
    return row


def mean_rows(rows: list[dict]) -> dict:
    """Per key: the mean over seeds (minutes to target: over the seeds that reached it, with the count)."""
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
        if key == "epochs_to_target":
            out["reached"] = f"{len(values)}/{len(rows)}"
    return out


# ---------------------------------------------------------------- the ensemble


def evaluate_saved(cfg, folders: list[Path], ensemble: bool) -> list[dict]:
    """The final evaluation details (`ConfusionMatrix.summary`) of the weights saved in each folder, on the
    evaluation split of cfg's data, in this process, by the harness's evaluation: one for the members'
    averaged outputs (`ensemble`), else one per folder."""
    import torch

    from stemdl.harness import checkpoint, dist, loop, mlperf
    from stemdl.harness.data import prepare
    from stemdl.harness.pipelines import Feed, build_pipeline
    from stemdl.harness.workload import StepContext
    from stemdl.workloads.spacegroup.heads import Ensemble
    from stemdl.workloads.spacegroup.workload import WORKLOAD

    env = dist.setup()
    try:
        quiet = mlperf.MLLogger(None, rank=1)  # rank 1: writes nothing
        prepared = prepare(WORKLOAD, WORKLOAD.ensure_data(cfg, env), cfg, env, quiet)
        pipe = build_pipeline("memory", prepared.train, prepared.eval, cfg, env,
                              feed=Feed(normalization=WORKLOAD.input_normalization))
        members = []
        for folder in folders:
            built = WORKLOAD.build(cfg, prepared)
            state = torch.load(checkpoint.resolve(folder), weights_only=False)
            built.model.load_state_dict(state["model"])
            members.append(built.model)
        ctx = StepContext(cfg, env, pipe.normalized)
        models = [Ensemble(members)] if ensemble else members
        return [dict(loop.evaluate(model, pipe, built.evaluator(ctx)).details) for model in models]
    finally:
        dist.teardown()


def ensemble_metrics(out: Path, base: str, seeds: list[int], extra: dict) -> dict:
    """Macro F1 etc. of the ce members' averaged outputs on the evaluation split (one process), evaluated
    by the harness's evaluation, as every run's last one is."""
    from stemdl.harness.config import load_config
    from stemdl.workloads.spacegroup.workload import WORKLOAD

    cfg = load_config(WORKLOAD, base, {**extra, "harness.seed": seeds[0]})
    folders = [_model_dir(out, "ce", seed) for seed in seeds]
    return {"final": evaluate_saved(cfg, folders, ensemble=True)[0], "history": []}


TRANSFER_FILE = "transfer.json"  # in a run's folder: its final weights scored on the other rendering


def transfer_metrics(out: Path, base: str, method: str, overrides: dict, seeds: list[int], extra: dict) -> dict:
    """{seed: metrics of the method's final weights on the evaluation split of `overrides`' data} (the
    other rendering), each computed once and kept in the run's folder as TRANSFER_FILE."""
    from stemdl.harness import files
    from stemdl.harness.config import load_config
    from stemdl.workloads.spacegroup.workload import WORKLOAD

    saved = {seed: _method_dir(out, method, seed) / TRANSFER_FILE for seed in seeds}
    missing = [seed for seed in seeds if not saved[seed].is_file()]
    if missing:
        print(f"stemdl ablate: {method}: scoring seeds {missing} on {overrides['harness.data']}", file=sys.stderr,
              flush=True)
        cfg = load_config(WORKLOAD, base, {**overrides, **extra, "harness.seed": missing[0]})
        folders = [_model_dir(out, method, seed) for seed in missing]
        for seed, folder in zip(missing, folders):
            if not folder.is_dir():
                raise StemdlError(f"{folder}: the final weights of {method} (seed {seed}) are gone, so they cannot be "
                                  f"scored on {overrides['harness.data']}; remove {folder.parent} to train it again")
        for seed, details in zip(missing, evaluate_saved(cfg, folders, ensemble=False)):
            metrics = {"data": overrides["harness.data"], "final": details, "history": []}
            files.write_atomic(saved[seed], json.dumps(metrics, indent=1) + "\n")
    return {seed: json.loads(saved[seed].read_text()) for seed in seeds}


# ---------------------------------------------------------------- the table


def table(study: str, rows: dict, config: dict) -> str:
    columns = [("macro_f1", "macro F1"), ("weighted_f1", "weighted F1"), ("top1", "top-1"),
               ("tail_macro_f1", "tail macro F1"), ("epochs_to_target", "epochs to target"), ("minutes_to_target", "min to target"), ("reached", "reached")]
    if study == "dynamical":
        columns = columns[:3] + [("class_top1", "class top-1")] + [(name, f"{name} F1") for name in PAIR_NAMES.values()]
    if study == "multitask":
        columns += [("crystal_system_accuracy", "crystal system acc."), ("centring_accuracy", "centring acc."),
                    ("lattice_mae_a", "MAE a (A)"), ("lattice_mae_alpha", "MAE alpha (deg)")]
    lines = [f"| method | {' | '.join(title for _, title in columns)} |", "|---" * (len(columns) + 1) + "|"]
    for method, row in rows.items():
        cells = []
        for key, _ in columns:
            value = row.get(key)
            cells.append("-" if value is None else value if isinstance(value, str) else f"{value:.4f}"
                         if key not in ("minutes_to_target", "epochs_to_target") else f"{value:.1f}")
        lines.append(f"| {method} | {' | '.join(cells)} |")
    head = (f"# stemdl ablate {study}\n\nBase config `{config['base']}`, data `{config['data']}`, seeds "
            f"{config['seeds']}, target macro F1 {config['target']}")
    if study == "dynamical":
        head += ("; class top-1: top-1 with each pair one class (its diffraction class); a pair's F1: the "
                 "macro F1 of its 2x2 block of the confusion matrix (0.5: chance); the rows 'Friedel "
                 "asymmetry alone' are one threshold on it, fitted on train.\n\n")
    else:
        head += (f"; tail = classes with fewer training samples than the median class ({config['tail_classes']} "
                 f"of {config['classes']}).\n\n")
    return head + "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the command


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", choices=list(STUDIES), help="which ablation")
    parser.add_argument("--out", required=True, help="folder for the runs and the table (resumed if it exists)")
    parser.add_argument("--config", default="ablation", help="base preset or YAML file (default: %(default)s)")
    parser.add_argument("--data", help="data folder (default: the base config's, generated if synthetic); "
                                       "dynamical: the folder of kinematic/ and multislice/ (required)")
    parser.add_argument("--methods", help="comma list (default: all of the study's)")
    parser.add_argument("--seeds", default="0", help="comma list of seeds (default: %(default)s)")
    parser.add_argument("--ensemble", type=int, default=3,
                        help="imbalance: members of the ce seed ensemble (0: none; default %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of every run, e.g. --set epochs=20")


def _plan(args) -> tuple[dict, list[int]]:
    study = STUDIES[args.study]
    names = args.methods.split(",") if args.methods else list(study)
    unknown = [n for n in names if n not in study]
    if unknown:
        raise StemdlError(f"--methods: {unknown[0]!r} is not one of {', '.join(study)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise StemdlError(f"--seeds {args.seeds!r}: expected a comma list of integers") from None
    return {n: study[n] for n in names}, seeds


def ensemble_seeds(seeds: list[int], k: int) -> list[int]:
    """The ce members of the ensemble: the study's seeds first, then the next unused ones, k in all."""
    if k < 2:
        return []
    members = list(dict.fromkeys(seeds))[:k]
    candidate = max(seeds) + 1
    while len(members) < k:
        members.append(candidate)
        candidate += 1
    return members


def _extra(args) -> dict:
    """The overrides every run of the study gets: --set, and --data (never filled with synthetic data)."""
    from stemdl.harness.config import parse_set

    extra = parse_set(args.set)
    if args.study == "dynamical":
        return extra  # each method names its own data (`data_for`)
    if args.data:
        extra.update({"harness.data": args.data, "harness.synth_preset": ""})
    return extra


def data_for(args, overrides: dict) -> dict:
    """A method's overrides with "@data" resolved to --data/<subfolder>, checked to hold a finished set."""
    if "@data" not in overrides:
        return overrides
    if not args.data:
        raise StemdlError(f"stemdl ablate {args.study}: --data is required: the folder holding kinematic/ and "
                          "multislice/ (stemdl synth DATA/kinematic --preset pairs --physics kinematic, the "
                          "same with multislice)")
    folder = Path(args.data) / overrides["@data"]
    if not (folder / "synth.json").is_file() and not any(folder.glob("*/*.h5")):
        raise StemdlError(f"{folder}: no data set here; make it with: stemdl synth {folder} --preset pairs "
                          f"--physics {'multislice' if 'multislice' in overrides['@data'] else 'kinematic'}")
    rest = {k: v for k, v in overrides.items() if k != "@data"}
    return {**rest, "harness.data": str(folder), "harness.synth_preset": ""}


def asymmetry_rows(data: Path, train_split: str, eval_split: str) -> dict:
    """The dynamical study's rows without a model: per rendering, each pair's dev F1 of one threshold on
    the samples' Friedel asymmetry (`friedel.pair_f1`)."""
    from stemdl.workloads.spacegroup import friedel

    rows = {}
    for kind in ("kinematic", "multislice"):
        train = friedel.sample_asymmetries(data / kind, train_split)
        dev = friedel.sample_asymmetries(data / kind, eval_split)
        rows[f"{kind}: Friedel asymmetry alone"] = {PAIR_NAMES[p]: friedel.pair_f1(train, dev, p) for p in PAIRS}
    return rows


def run(args: argparse.Namespace) -> int:
    from stemdl.harness import files
    from stemdl.harness.config import load_config
    from stemdl.workloads.spacegroup.workload import WORKLOAD

    planned, seeds = _plan(args)
    methods = {name: data_for(args, {k: v for k, v in o.items() if k != "@transfer"}) for name, o in planned.items()}
    transfers = {name: data_for(args, {"@data": o["@transfer"]}) for name, o in planned.items() if "@transfer" in o}
    extra = _extra(args)
    base = load_config(WORKLOAD, args.config, {**extra, **next(iter(methods.values()))})  # bad keys fail here
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    members = ensemble_seeds(seeds, args.ensemble) if args.study == "imbalance" and "ce" in methods else []
    results = {}
    for method, overrides in methods.items():
        for seed in sorted(set(seeds) | (set(members) if method == "ce" else set())):
            keep = (method == "ce" and seed in members) or method in transfers
            results.setdefault(method, {})[seed] = run_method(out, args.config, method, overrides, seed, extra,
                                                              keep_model=keep)
        if method in transfers:  # the row scores the final weights on the other rendering
            results[method] = transfer_metrics(out, args.config, method, {**overrides, **transfers[method]},
                                               seeds, extra)
    counts = _train_counts(out, methods, seeds)
    tail, target = tail_classes(counts), base.harness.target
    pairs = PAIRS if args.study == "dynamical" else ()
    per_seed = {m: {s: summarize_run(results[m][s], tail, target, pairs) for s in seeds} for m in methods}
    rows = {m: mean_rows(list(per_seed[m].values())) for m in methods}
    if args.study == "dynamical":
        rows.update(asymmetry_rows(Path(args.data), base.harness.train_split, base.harness.eval_split))
    if members:
        ens = ensemble_metrics(out, args.config, members, extra)
        rows[f"{ENSEMBLE} ({len(members)} x ce)"] = mean_rows([summarize_run(ens, tail, target)])
    config = {"base": args.config, "data": args.data if args.study == "dynamical" else base.harness.data, "seeds": seeds, "target": target,
              "tail_classes": len(tail), "classes": int(np.count_nonzero(counts)), "members": members,
              "overrides": extra}
    files.write_atomic(out / "ablation.json", json.dumps({"study": args.study, "config": config, "rows": rows,
                                                          "per_seed": per_seed}, indent=1) + "\n")
    text = table(args.study, rows, config)
    files.write_atomic(out / "ablation.md", text)
    print(text, flush=True)
    return 0


def _train_counts(out: Path, methods: dict, seeds: list[int]) -> np.ndarray:
    """Training samples per class index, as the first run saw them (its saved config names the data)."""
    from stemdl.harness.shards import ShardSet, is_shard_dir
    from stemdl.workloads.spacegroup.data.layout import class_counts, class_index

    first = next(iter(methods))
    saved = sorted(_method_dir(out, first, seeds[0]).glob("result_*.config.json"))[-1]
    h = json.loads(saved.read_text())["harness"]
    if is_shard_dir(h["data"]):
        return class_counts(ShardSet.open(h["data"], verify="none").split(h["train_split"]).fields["labels"])
    from stemdl.workloads.spacegroup.data.index import load_or_build

    index = load_or_build(h["data"], quiet=True)
    return class_counts(class_index(index.label[index.select(h["train_split"])]))

"""The MLPerf HPC v3.0 rule files of a workload, for both divisions, made from its contract.

    files = rule_files(workload)      # {"hpc_3.0.0/closed_stemdl.yaml": text, "hpc_3.0.0/open_stemdl.yaml": text}

The official checker runs hpc_3.0.0/common.yaml; its submission_division rule enqueues
{division}_common.yaml, whose submission_benchmark rule enqueues {division}_{benchmark}.yaml, the file made
here (the official package knows only its own benchmarks). {division}_common.yaml rejects the benchmark
name it does not know; these rules redefine submission_benchmark, and a KEY redefined by a later file
replaces the earlier files' rule for that key (the checker drops their messages for it), so every KEY here
restates the official checks it replaces (timeline, counts) and adds the benchmark's own.

Both divisions get the same rules but for what MLPerf fixes in the closed one: the target (the workload's,
logged before the clock; open: any value in the workload's range, which the run's evaluations are then
judged against), at least one evaluation at or beyond that target (a closed log that never reached it fails,
as the official closed rules make it fail: `ATLEAST_ONE_CHECK`), the optimizer and the warmup key. A
workload adds closed-division rules of its own (`Workload.closed_rules`).
"""

from __future__ import annotations

import yaml

USAGE, RULESET = "hpc", "3.0.0"
RULES_FOLDER = f"{USAGE}_{RULESET}"
DIVISIONS = ("closed", "open")
OPTIMIZERS = ("adamw",)  # the harness's optimizer: what a closed run may name

_STATE = ("'init_started': False, 'init_stopped': False, 'run_started': False, 'run_stopped': False, "
          "'first_init_start': 9e99, 'in_epoch': False, 'epoch': None, 'in_eval': False, 'eval_epoch': None, "
          "'last_eval': None, 'staging_started': False")
_IN_RUN = "s['run_started'] and not s['run_stopped']"
_INIT_LIMIT = "ll.timestamp - s['first_init_start'] < (30*60*1e3)"


def file_name(benchmark: str, division: str) -> str:
    return f"{RULES_FOLDER}/{division}_{benchmark}.yaml"


def reaches(workload, value: str, target: str) -> str:
    """The rules' expression for "value reached target" in the workload's direction."""
    return f"{value} >= {target}" if workload.direction == "max" else f"{value} <= {target}"


def _key(name: str, req: str | None = None, check=None, post: str | None = None, **more) -> dict:
    record = {"NAME": name}
    if req:
        record["REQ"] = req
    if check:
        record["CHECK"] = check
    if post:
        record["POST"] = post
    return {"KEY": {**record, **more}}


def _bounds(low, high) -> list[str]:
    return [f"v['value'] >= {low!r}"] * (low is not None) + [f"v['value'] <= {high!r}"] * (high is not None)


def timeline() -> list[dict]:
    """Cache cleared, then init (at most 30 minutes up to run_start), then exactly one run."""
    return [
        _key("cache_clear", "AT_LEAST_ONE", ["v['value'] == True", "not s['init_started']"]),
        _key("init_start", "AT_LEAST_ONE", ["not s['init_stopped']", "not s['run_started']"],
             "s['init_started'] = True; s['first_init_start'] = min(s['first_init_start'], ll.timestamp)"),
        _key("init_stop", "EXACTLY_ONE", ["s['init_started']", "not s['init_stopped']", "not s['run_started']",
                                          _INIT_LIMIT], "s['init_stopped'] = True"),
        _key("run_start", "EXACTLY_ONE", ["s['init_stopped']", "not s['run_started']", _INIT_LIMIT],
             "s['run_started'] = True"),
    ]


def run_stop(workload) -> dict:
    """success: the last evaluation before run_stop reached the target; aborted: the run gave up (out of its
    epoch budget, or killed), whatever it reached. A run stopped inside an epoch may lack its epoch_stop."""
    reached = reaches(workload, "s['last_eval']", "s['target']")
    return _key("run_stop", "EXACTLY_ONE", [
        "s['run_started']", "not s['run_stopped']", "v['metadata'].get('status') in ['success', 'aborted']",
        f"v['metadata'].get('status') != 'success' or (s['last_eval'] is not None and {reached})"],
        "s['run_stopped'] = True")


def epochs_and_evaluations() -> list[dict]:
    """Inside the run, numbered, paired, epochs in increasing order."""
    numbered = "'epoch_num' in v['metadata']"
    return [
        _key("epoch_start", "AT_LEAST_ONE", [numbered, _IN_RUN, "not s['in_epoch']",
                                             "s['epoch'] is None or v['metadata']['epoch_num'] > s['epoch']"],
             "s['in_epoch'] = True; s['epoch'] = v['metadata']['epoch_num']"),
        _key("epoch_stop", "AT_LEAST_ONE", [numbered, "s['in_epoch'] and v['metadata'].get('epoch_num') == s['epoch']",
                                            "not s['run_stopped']"], "s['in_epoch'] = False"),
        _key("eval_start", "AT_LEAST_ONE", [numbered, _IN_RUN, "not s['in_eval']"],
             "s['in_eval'] = True; s['eval_epoch'] = v['metadata']['epoch_num']"),
        _key("eval_stop", "AT_LEAST_ONE", [numbered, "s['in_eval'] and v['metadata'].get('epoch_num') == s['eval_epoch']",
                                           "not s['run_stopped']"], "s['in_eval'] = False"),
    ]


def eval_values(workload, division: str) -> list[dict]:
    """The workload's eval keys, the target metric's first: inside the run, of the latest evaluation, in
    bounds; the target metric at least once, and in the closed division at least once at the target."""
    keys = []
    for k, key in enumerate(workload.log_keys.values()):
        check = ["'epoch_num' in v['metadata']", _IN_RUN, "v['metadata'].get('epoch_num') == s['eval_epoch']",
                 *_bounds(*workload.log_bounds.get(key, (None, None)))]
        if k:
            keys.append(_key(key, check=check))
            continue
        more = {"ATLEAST_ONE_CHECK": reaches(workload, "v['value']", "s['target']")} if division == "closed" else {}
        keys.append(_key(key, "AT_LEAST_ONE", check, "s['last_eval'] = v['value']", **more))
    return keys


def target(workload, division: str) -> dict:
    """The target, logged before the clock starts: fixed in the closed division, chosen in the open one."""
    low, high = workload.target_range
    if division == "closed":
        return _key(workload.target_key, "EXACTLY_ONE",
                    [f"math.isclose(v['value'], {workload.target_value!r})", "not s['run_started']"])
    return _key(workload.target_key, "EXACTLY_ONE",
                [f"v['value'] > {low!r} and v['value'] <= {high!r}", "not s['run_started']"],
                "s['target'] = v['value']")


def hyperparameters(workload, division: str) -> list[dict]:
    closed = division == "closed"
    positive_int = "is_integer(v['value']) and v['value'] > 0"
    keys = [
        _key("train_samples", "EXACTLY_ONE", positive_int),
        _key("eval_samples", "EXACTLY_ONE", positive_int),
        _key("global_batch_size", "EXACTLY_ONE", positive_int),
        _key("seed", "EXACTLY_ONE", "is_integer(v['value']) and v['value'] >= 0"),
        _key("opt_name", "EXACTLY_ONE", f"v['value'] in {list(OPTIMIZERS)!r}" if closed
             else "isinstance(v['value'], str) and v['value'] != ''"),
        _key("opt_base_learning_rate", "EXACTLY_ONE", "v['value'] > 0."),
        _key("opt_weight_decay", "EXACTLY_ONE", "v['value'] >= 0."),
        _key("opt_learning_rate_warmup_epochs", "EXACTLY_ONE" if closed else None, "v['value'] >= 0."),
    ]
    if closed:
        keys += [_key(name, "EXACTLY_ONE", list(checks)) for name, checks in workload.closed_rules.items()]
    return keys


def staging_and_resumption() -> list[dict]:
    """Staging (MLPerf HPC v3.0: inside init, outside the clock); a resumed run is never compliant (its
    clock started in another process)."""
    return [
        _key("staging_start", check=["s['init_started']", "not s['run_started']"], post="s['staging_started'] = True"),
        _key("staging_stop", check=["s['staging_started']", "not s['run_started']",
                                    "is_integer(v['metadata'].get('bytes')) and v['metadata']['bytes'] >= 0"]),
        _key("resumed_from_checkpoint", check="False"),
    ]


def rules(workload, division: str) -> list[dict]:
    if division not in DIVISIONS:
        raise ValueError(f"division {division!r} is not one of {', '.join(DIVISIONS)}")
    begin = {"BEGIN": {"CODE": f"s.update({{'target': {workload.target_value!r}, {_STATE}}})"}}
    submission = [
        _key("submission_benchmark", "EXACTLY_ONE", f"v['value'] == {workload.name!r}"),
        _key("number_of_nodes", "EXACTLY_ONE", "is_integer(v['value']) and v['value'] > 0"),
        _key("accelerators_per_node", "EXACTLY_ONE", "is_integer(v['value']) and v['value'] >= 0"),
    ]
    return [begin, *submission, *timeline(), run_stop(workload), *epochs_and_evaluations(),
            *eval_values(workload, division), target(workload, division), *hyperparameters(workload, division),
            *staging_and_resumption()]


def render(workload, division: str) -> str:
    head = (f"# {workload.name}, {division} division: MLPerf HPC v{RULESET} rules made by stemdl.harness.rules from\n"
            f"# the workload's contract (target {workload.target_metric} {workload.direction} "
            f"{workload.target_value}). Regenerate with `stemdl check --write-rules DIR`; do not edit.\n")
    return head + yaml.safe_dump(rules(workload, division), sort_keys=False, width=120, default_flow_style=False)


def rule_files(workload) -> dict[str, str]:
    """{relative file name: YAML text} of both divisions."""
    return {file_name(workload.name, d): render(workload, d) for d in DIVISIONS}

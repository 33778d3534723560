"""`stemdl bench io-reconstruction` prints its rows (figures, not judged) and the figures of
docs/reconstruction.md are drawn from a run's checkpoint and metrics."""

import json

import numpy as np
import pytest

from stemdl.cli import main
from stemdl.workloads.reconstruction import figures

NAME = "stemdl_reconstruction"


def test_the_io_bench_prints_every_row(smoke_data, tmp_path, capsys):
    out = tmp_path / "io.json"
    assert main(["bench", "io-reconstruction", "--data", str(smoke_data), "--batch", "2", "--rounds", "1",
                 "--epochs", "1", "--steps", "1", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bytes a sample: payload 8,192" in printed
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["rows"]]
    assert names[:3] == ["limit", "h5", "torch"] and names[-1] == "step"
    assert all(r["best"] > 0 and len(r["samples_per_s"]) == 1 for r in report["rows"])
    assert report["shard_bytes_per_sample"] >= 8192 and report["h5_bytes_per_sample"] > 8192
    assert main(["bench", "io-reconstruction", "--data", str(smoke_data), "--json", str(out)]) == 2, \
        "a report is never overwritten"
    assert "exists" in capsys.readouterr().err


def test_the_mosaic_puts_pattern_k_at_its_probe():
    stack = np.arange(9 * 2 * 2).reshape(9, 2, 2)
    m = figures.mosaic(stack)
    assert m.shape == (6, 6)
    assert np.array_equal(m[2:4, 4:6], stack[5])  # probe 5 of a 3x3 grid: row 1, column 2
    with pytest.raises(Exception, match="not a square probe grid"):
        figures.mosaic(np.zeros((8, 2, 2)))


def test_the_figures_from_a_runs_checkpoint_and_metrics(smoke_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert main(["run", "--benchmark", NAME, "--config", "smoke", "--data", str(smoke_data), "--log-dir",
                 str(tmp_path / "log"), "--set", f"checkpoint_dir={ckpt}", "--set", "checkpoint_every=2"]) == 0
    png = tmp_path / "samples.png"
    assert figures.main(["samples", str(png), "--data", str(smoke_data), "--checkpoint",
                         str(ckpt / "epoch_0002.pt"), "--samples", "2"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = tmp_path / "curves.png"
    assert figures.main(["curves", str(curves), str(tmp_path / "log" / "result_0.metrics.json"),
                         "--target", "0.7"]) == 0
    assert curves.stat().st_size > 1000
    assert figures.main(["samples", str(png), "--data", str(smoke_data), "--checkpoint", str(png)]) == 2

"""`stemdl bench physics` with tiny settings: every figure printed and in the JSON, a missing CUDA one line."""

import json

import pytest
import torch

from stemdl.cli import main

TINY = ["bench", "physics", "--size", "32", "--thickness", "1", "--scan", "2", "--rounds", "1", "--threads", "1",
        "--samples", "1", "--preset", "tiny-multislice"]


def test_prints_and_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "physics.json"
    assert main([*TINY, "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    figures = [line for line in lines if "patterns/s" in line]
    expected = ["Si [110] single", "Si [110] 2x2 scan", "P2_1/c single", "P2_1/c 2x2 scan"]
    assert len(figures) == 4 and all(" ".join(line.split()).startswith(e) for line, e in zip(figures, expected))
    assert all("of the FFT limit" in line and "peak" in line and " MB" in line for line in figures)
    assert any("tiny-multislice-preset sample" in line and "kinematic" in line and "multislice" in line
               for line in lines)
    report = json.loads(out.read_text())
    assert (report["size"], report["scan"], report["device"]) == (32, 2, "cpu")
    assert set(report["patterns"]) == {"Si [110], single", "Si [110], 2x2 scan", "P2_1/c, single", "P2_1/c, 2x2 scan"}
    for name, r in report["patterns"].items():
        assert r["patterns_per_s"] > 0 and r["fft_seconds"] > 0 and r["fraction_of_fft_limit"] > 0
        assert r["probes"] == (1 if "single" in name else 4) and r["ffts"] == 2 * r["slices"] * r["probes"]
        assert r["memory"]["peak_MB"] > 0 and r["memory"]["how"]
    sample = report["sample"]
    assert sample["kinematic_s_per_sample"] > 0 and sample["ratio"] == pytest.approx(
        sample["multislice_s_per_sample"] / sample["kinematic_s_per_sample"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_without_cuda_it_says_so_in_one_line(capsys):
    assert main(["bench", "physics", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "stemdl bench: error: --device cuda: CUDA is not available on this machine\n"

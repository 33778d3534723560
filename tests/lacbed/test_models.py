"""The LACBED surrogates: shapes and sizes, the ZNCC loss (blind to gain and offset, 1 for unrelated
patterns), the KL term, and both networks learning a potential-to-pattern map on a handful of pairs."""

import math

import numpy as np
import pytest
import torch

from stemdl.harness.errors import StemdlError
from stemdl.physics.bloch import zncc as bloch_zncc
from stemdl.workloads.lacbed.models import LacbedVAE, SurrogateLoss, build_model, z_values, zncc


def test_shapes_and_the_parameter_count_of_a_tiny_vae():
    model = LacbedVAE(8, channels=(2, 3), latent=4)
    # conv 1->2 (16+1)*2, conv 2->3 (32+1)*3, linear 12->8, linear 4->12, convT 3->2 (48+... ) and 2->1
    expected = (1 * 16 + 1) * 2 + (2 * 16 + 1) * 3 + (3 * 4 + 1) * 8 + (4 + 1) * 12 + (3 * 16 * 2 + 2) + (2 * 16 * 1 + 1)
    assert sum(p.numel() for p in model.parameters()) == expected
    pattern, mu, logvar = model(torch.randn(5, 1, 8, 8))
    assert pattern.shape == (5, 1, 8, 8) and mu.shape == logvar.shape == (5, 4)
    model.eval()
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x)[0], model(x)[0]), "evaluation decodes the mean: deterministic"
    assert build_model("unet", 16)(torch.randn(3, 1, 16, 16)).shape == (3, 1, 16, 16)
    with pytest.raises(StemdlError, match="divisible by 4"):
        build_model("vae", 18)
    with pytest.raises(StemdlError, match="unknown model"):
        build_model("gan", 16)


def test_z_is_blind_to_gain_and_offset_and_matches_the_physics_zncc():
    rng = np.random.default_rng(0)
    a, b = rng.random((4, 1, 6, 6)), rng.random((4, 1, 6, 6))
    ta, tb = torch.tensor(a), torch.tensor(b)
    assert torch.allclose(z_values(3.0 * ta + 2.0, ta), torch.zeros(4, dtype=torch.float32), atol=1e-6)
    assert torch.allclose(z_values(-ta, ta), torch.full((4,), 2.0), atol=1e-6)
    assert np.allclose(zncc(ta, tb).numpy()[:, 0], bloch_zncc(a[:, 0], b[:, 0]), atol=1e-9)
    assert math.isfinite(float(zncc(torch.ones(1, 6, 6), tb[0]).sum())), "a constant image stays finite"


def test_the_kl_term():
    loss = SurrogateLoss(kl_weight=0.5)
    target = torch.randn(3, 1, 4, 4)
    zero = torch.zeros(3, 2)
    assert float(loss((target, zero, zero), target)) == pytest.approx(0.0, abs=1e-6)
    mu = torch.ones(3, 2)  # KL of N(1, 1) from N(0, 1): 1/2 a dimension
    assert float(loss((target, mu, zero), target)) == pytest.approx(0.5 * 2 * 0.5, abs=1e-6)
    assert float(loss(target, target)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["vae", "unet"])
def test_both_networks_learn_a_map_from_potential_to_pattern(name):
    """Eight random 'potentials' and a fixed nonlinear map of each (a blurred square): the training loss
    falls well below its start (a network that cannot learn fails this)."""
    torch.manual_seed(0)
    x = torch.rand(8, 1, 16, 16)
    blur = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    y = blur**2 + 0.5 * blur
    model = build_model(name, 16, channels=(8, 16), **({"latent": 12} if name == "vae" else {}))
    loss_fn = SurrogateLoss(kl_weight=1e-4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.eval()
    with torch.no_grad():
        start = float(z_values(model(x)[0] if name == "vae" else model(x), y).mean())
    model.train()
    for _ in range(150):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        end = float(z_values(model(x)[0] if name == "vae" else model(x), y).mean())
    assert end < 0.5 * start and end < 0.3, (start, end)


def test_the_speedup_bench_prints_and_keeps_its_figures(tmp_path, capsys):
    import json

    from stemdl.cli import main

    out = tmp_path / "lacbed.json"
    assert main(["bench", "lacbed", "--size", "16", "--beams", "30", "--materials", "1", "--batch", "4",
                 "--rounds", "1", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| Bloch waves" in printed and "| vae, batch 4 |" in printed and "| unet, batch 4 |" in printed
    report = json.loads(out.read_text())
    assert report["simulator_s_per_pattern"] > 0 and set(report["speedup"]) == {"vae", "unet"}
    assert main(["bench", "lacbed", "--json", str(out)]) == 2, "a report is never overwritten"

"""The imbalance losses: each equals its formula computed by hand, reduces to cross entropy where it should,
and stays finite with classes absent from training."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stemdl.harness.errors import StemdlError
from stemdl.workloads.spacegroup.data.layout import class_counts
from stemdl.workloads.spacegroup.losses import LOSSES, build_loss, default_drw_epoch

COUNTS = np.array([500, 0, 40, 3, 0, 1])  # classes 1 and 4 absent from training


def _batch(seed=0, scale=3.0, classes=6, size=16):
    g = torch.Generator().manual_seed(seed)
    present = torch.tensor([0, 2, 3, 5])
    return torch.randn(size, classes, generator=g) * scale, present[torch.randint(0, 4, (size,), generator=g)]


def _ce_by_hand(logits: np.ndarray, y: np.ndarray, smoothing: float = 0.0) -> np.ndarray:
    """Per-sample cross entropy with label smoothing, from the log-softmax in float64."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    k = logits.shape[1]
    target = np.full_like(logp, smoothing / k)
    target[np.arange(len(y)), y] += 1.0 - smoothing
    return -(target * logp).sum(axis=1)


def _loss(name, logits, y, epoch=1, counts=COUNTS, **options):
    return float(build_loss(name, counts, epochs=10, **options)(logits, y, epoch))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_is_the_mean_cross_entropy(smoothing):
    logits, y = _batch()
    want = _ce_by_hand(logits.double().numpy(), y.numpy(), smoothing).mean()
    assert _loss("ce", logits, y, label_smoothing=smoothing) == pytest.approx(want, rel=1e-5)


def test_weighted_uses_inverse_counts_averaging_one_over_the_training_samples():
    logits, y = _batch(1)
    raw = np.array([1 / 500, 0, 1 / 40, 1 / 3, 0, 1.0])
    weight = raw * COUNTS.sum() / (COUNTS * raw).sum()
    assert (COUNTS * weight).sum() / COUNTS.sum() == pytest.approx(1.0)
    want = (weight[y.numpy()] * _ce_by_hand(logits.double().numpy(), y.numpy(), 0.1)).mean()
    loss = build_loss("weighted", COUNTS, label_smoothing=0.1)
    assert float(loss(logits, y, 1)) == pytest.approx(want, rel=1e-5)
    assert np.allclose(loss.weight.numpy(), weight, rtol=1e-6) and loss.weight.dtype == torch.float32


@pytest.mark.parametrize("beta", [0.9, 0.9999])
def test_class_balanced_uses_the_effective_number_of_samples(beta):
    logits, y = _batch(2)
    with np.errstate(divide="ignore"):
        raw = np.where(COUNTS > 0, (1 - beta) / (1 - beta ** COUNTS.astype(float)), 0.0)
    weight = raw * COUNTS.sum() / (COUNTS * raw).sum()
    want = (weight[y.numpy()] * _ce_by_hand(logits.double().numpy(), y.numpy())).mean()
    loss = build_loss("class_balanced", COUNTS, cb_beta=beta)
    assert float(loss(logits, y, 1)) == pytest.approx(want, rel=1e-5)
    assert np.allclose(loss.weight.numpy(), weight, rtol=1e-5)


@pytest.mark.parametrize("name", ["weighted", "class_balanced", "drw"])
def test_reweighting_is_ce_when_the_present_classes_are_balanced(name):
    logits, y = _batch(3)
    balanced = np.array([7, 0, 7, 7, 0, 7])
    ce = _loss("ce", logits, y, counts=balanced, label_smoothing=0.05)
    assert _loss(name, logits, y, epoch=10, counts=balanced, label_smoothing=0.05) == pytest.approx(ce, rel=1e-6)


def test_class_balanced_with_beta_zero_is_ce():
    logits, y = _batch(4)
    assert _loss("class_balanced", logits, y, cb_beta=0.0) == pytest.approx(_loss("ce", logits, y), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_is_the_modulated_cross_entropy(gamma):
    logits, y = _batch(5)
    ce = _ce_by_hand(logits.double().numpy(), y.numpy())
    want = ((1 - np.exp(-ce)) ** gamma * ce).mean()
    assert _loss("focal", logits, y, focal_gamma=gamma) == pytest.approx(want, rel=1e-5)
    assert _loss("focal", logits, y, focal_gamma=0.0) == pytest.approx(_loss("ce", logits, y), rel=1e-6)


def test_logit_adjusted_adds_tau_log_prior_with_the_rarest_prior_for_absent_classes():
    logits, y = _batch(6)
    prior = COUNTS / COUNTS.sum()
    prior[COUNTS == 0] = 1 / COUNTS.sum()  # the rarest class present has 1 sample
    adjusted = logits.double().numpy() + 1.5 * np.log(prior)
    want = _ce_by_hand(adjusted, y.numpy(), 0.1).mean()
    assert _loss("logit_adjusted", logits, y, la_tau=1.5, label_smoothing=0.1) == pytest.approx(want, rel=1e-5)
    assert _loss("logit_adjusted", logits, y, la_tau=0.0) == pytest.approx(_loss("ce", logits, y), rel=1e-6)


def test_drw_switches_to_class_balanced_weights_at_its_epoch():
    logits, y = _batch(7)
    loss = build_loss("drw", COUNTS, drw_epoch=4, cb_beta=0.99)
    ce, cb = _loss("ce", logits, y), _loss("class_balanced", logits, y, cb_beta=0.99)
    assert cb != pytest.approx(ce, rel=1e-3)
    assert [float(loss(logits, y, e)) for e in (1, 3, 4, 9)] == pytest.approx([ce, ce, cb, cb], rel=1e-6)


def test_drw_default_epoch_is_the_last_fifth_of_the_budget():
    assert [default_drw_epoch(e) for e in (40, 10, 3, 1)] == [33, 9, 3, 1]
    assert build_loss("drw", COUNTS, epochs=200).drw_epoch == 161  # Cao et al.: 160 of 200 epochs unweighted


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_are_finite_with_absent_classes_and_confident_logits(name):
    logits, y = _batch(8, scale=60.0)  # p_t rounds to 1 for most samples
    logits.requires_grad_(True)
    loss = build_loss(name, COUNTS, epochs=10, label_smoothing=0.1, focal_gamma=0.5)(logits, y, 10)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_buffers_follow_the_module_and_bf16_logits_give_a_float32_loss(name):
    loss = build_loss(name, COUNTS, epochs=10)
    assert all(b.device.type == "meta" for b in loss.to("meta").buffers())
    logits, y = _batch(9)
    value = build_loss(name, COUNTS, epochs=10)(logits.bfloat16(), y, 10)
    assert value.dtype == torch.float32 and value.shape == ()


def test_unknown_loss_names_the_key_and_the_choices():
    with pytest.raises(StemdlError, match=r"'loss': 'lda' is not one of ce, weighted, class_balanced, focal"):
        build_loss("lda", COUNTS)


@pytest.mark.parametrize("options, key", [
    ({"focal_gamma": -1.0}, "focal_gamma"), ({"cb_beta": 1.0}, "cb_beta"), ({"cb_beta": -0.1}, "cb_beta"),
    ({"la_tau": -1.0}, "la_tau"), ({"la_tau": float("nan")}, "la_tau"), ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"drw_epoch": 0}, "drw_epoch"), ({"drw_epoch": 11, "epochs": 10}, "drw_epoch"), ({}, "drw_epoch"),
])
def test_bad_options_name_their_key(options, key):
    with pytest.raises(StemdlError, match=f"'{key}'"):
        build_loss("drw", COUNTS, **options)


def test_counts_must_hold_samples():
    for bad in (np.zeros(6), np.array([3, -1]), np.array([])):
        with pytest.raises(StemdlError, match="class counts"):
            build_loss("ce", bad)


def test_class_counts_from_class_indices():
    assert class_counts(np.array([0, 5, 5, 229])).tolist() == [1] + [0] * 4 + [2] + [0] * 223 + [1]
    with pytest.raises(ValueError, match="0..229"):
        class_counts(np.array([230]))


def test_a_weighted_loss_matches_torch_per_sample_weights():
    # Cross-check against torch's own weighted form: mean(w_y * l) = sum(w_y l) / sum(w_y) * mean(w_y).
    logits, y = _batch(10)
    loss = build_loss("weighted", COUNTS)
    w = loss.weight
    torch_mean = F.cross_entropy(logits, y, weight=w) * w[y].mean()
    assert float(loss(logits, y, 1)) == pytest.approx(float(torch_mean), rel=1e-5)

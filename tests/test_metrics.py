"""The confusion-matrix metrics against scikit-learn: random predictions, absent classes, padding, 2 ranks."""

import json
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from stemdl.harness.errors import StemdlError
from stemdl.harness.metrics import ConfusionMatrix, Sums, all_reduce, dense_confusion


def sklearn_scores(y, p):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined precision/recall: sklearn warns, we do not
        labels = np.union1d(y, p)
        prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
        return {"macro": f1_score(y, p, average="macro"), "weighted": f1_score(y, p, average="weighted"),
                "accuracy": accuracy_score(y, p), "labels": labels, "precision": prec, "recall": rec,
                "f1": f1, "support": sup}


def random_case(rng, num_classes, n):
    """Targets from a random subset of the classes (so some never occur), predictions mostly right,
    sometimes a class that never occurs in the targets, sometimes anything."""
    used = rng.choice(num_classes, size=rng.integers(1, num_classes + 1), replace=False)
    y = rng.choice(used, size=n)
    p = np.where(rng.random(n) < 0.6, y, rng.integers(0, num_classes, n))
    return y, p


def assert_matches_sklearn(cm, y, p):
    ref = sklearn_scores(y, p)
    assert abs(cm.macro_f1() - ref["macro"]) <= 1e-12
    assert abs(cm.weighted_f1() - ref["weighted"]) <= 1e-12
    assert abs(cm.accuracy() - ref["accuracy"]) <= 1e-12
    rows = cm.per_class()
    assert [r["class"] for r in rows] == list(ref["labels"])
    for key in ("precision", "recall", "f1", "support"):
        np.testing.assert_allclose([r[key] for r in rows], ref[key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_equals_sklearn_on_random_predictions(seed):
    rng = np.random.default_rng(seed)
    num_classes = int(rng.choice([2, 7, 50, 230]))
    y, p = random_case(rng, num_classes, int(rng.integers(1, 600)))
    cm = ConfusionMatrix(num_classes)
    for chunk in np.array_split(np.arange(len(y)), 3):  # batches, some maybe empty
        cm.update(torch.from_numpy(y[chunk]), torch.from_numpy(p[chunk]))
    assert cm.samples == len(y)
    assert_matches_sklearn(cm, y, p)


def test_predicted_class_absent_from_targets_counts_with_f1_zero():
    y, p = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 3])  # class 3 only predicted; 2 nowhere
    cm = ConfusionMatrix(5).update(torch.from_numpy(y), torch.from_numpy(p))
    assert cm.macro_f1() == pytest.approx((1 + 2 / 3 + 0) / 3, abs=1e-15)
    assert [r["class"] for r in cm.per_class()] == [0, 1, 3]
    assert cm.per_class()[2] == {"class": 3, "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert_matches_sklearn(cm, y, p)


def test_scores_are_argmaxed_and_padding_is_ignored():
    rng = np.random.default_rng(3)
    y, p = random_case(rng, 12, 64)
    logits = torch.nn.functional.one_hot(torch.from_numpy(p), 12).float() + 0.01 * torch.rand(64, 12)
    mask = torch.from_numpy(rng.random(64) < 0.7)
    # Padding carries junk, labels outside the range included: the mask must keep it out entirely.
    y_pad = torch.from_numpy(y).masked_fill(~mask, 99)
    cm = ConfusionMatrix(12).update(y_pad, logits, mask)
    keep = mask.numpy()
    assert cm.samples == keep.sum()
    assert_matches_sklearn(cm, y[keep], p[keep])


def test_label_outside_the_classes_is_an_error_when_read():
    cm = ConfusionMatrix(4).update(torch.tensor([0, 4]), torch.tensor([0, 1]))
    with pytest.raises(StemdlError, match="outside 0..3"):
        cm.macro_f1()


def test_empty_matrix_and_json():
    cm = ConfusionMatrix(3)
    assert (cm.macro_f1(), cm.weighted_f1(), cm.accuracy(), cm.per_class()) == (0.0, 0.0, 0.0, [])
    cm.update(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 1]))
    d = cm.summary()
    assert json.loads(json.dumps(d)) == d, "plain JSON values"
    assert d["samples"] == 4 and d["accuracy"] == 0.75 and len(d["per_class"]) == 3
    assert d["macro_f1"] == cm.macro_f1()
    assert d["confusion"] == [[0, 0, 1], [1, 1, 1], [2, 1, 1], [2, 2, 1]]
    np.testing.assert_array_equal(dense_confusion(d["confusion"], 3), cm.matrix())


def test_all_reduce_without_process_group_is_a_noop_and_only_once():
    cm = ConfusionMatrix(3).update(torch.tensor([0, 1]), torch.tensor([0, 2]))
    before = cm.matrix().copy()
    cm.all_reduce()
    np.testing.assert_array_equal(cm.matrix(), before)
    with pytest.raises(RuntimeError):
        cm.all_reduce()
    with pytest.raises(RuntimeError):
        cm.update(torch.tensor([0]), torch.tensor([0]))


# ---- two ranks -----------------------------------------------------------------------------------------

NUM_CLASSES = 30


def _rank_data():
    """The global predictions and each rank's uneven share: 37 samples on rank 0, 11 (+5 padding) on 1."""
    y, p = random_case(np.random.default_rng(7), NUM_CLASSES, 48)
    return y, p, [(y[:37], p[:37]), (y[37:], p[37:])]


def _rank_main(rank, store_path, out_path):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        _, _, shares = _rank_data()
        y, p = (torch.from_numpy(a) for a in shares[rank])
        mask = torch.ones(len(y), dtype=torch.bool)
        if rank == 1:  # pad to 16 like a fixed-size last batch; the padding must not count
            y = torch.cat([y, torch.zeros(5, dtype=y.dtype)])
            p = torch.cat([p, torch.ones(5, dtype=p.dtype)])
            mask = torch.cat([mask, torch.zeros(5, dtype=torch.bool)])
        cm = ConfusionMatrix(NUM_CLASSES).update(y, p, mask)
        other = Sums(2, torch.float64)  # a second meter, reduced in the same collective
        other.sums += torch.tensor([rank + 0.5, 1.0], dtype=torch.float64)
        all_reduce(cm, other)
        with open(f"{out_path}.{rank}", "w") as f:
            f.write(json.dumps({**cm.summary(), "other": other.sums.tolist()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_two_ranks_with_uneven_shares_equal_sklearn_on_the_gathered_predictions(tmp_path, monkeypatch):
    if "lo" in {name for _, name in socket.if_nameindex()}:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on loopback, whatever the hostname says
    out = tmp_path / "result"
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    y, p, _ = _rank_data()
    ref = sklearn_scores(y, p)
    for rank in range(2):
        d = json.loads((tmp_path / f"result.{rank}").read_text())
        assert d["samples"] == 48 and d["other"] == [2.0, 2.0]
        assert abs(d["macro_f1"] - ref["macro"]) <= 1e-12
        assert abs(d["weighted_f1"] - ref["weighted"]) <= 1e-12
        assert abs(d["accuracy"] - ref["accuracy"]) <= 1e-12

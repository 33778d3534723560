"""Multi-task targets, heads, loss and metrics: tables against spglib, transforms, shapes, the loss formulas,
metrics against numpy (also over 2 ranks), and a short training run whose loss falls."""

import copy
import math

import h5py
import numpy as np
import pytest
import spglib
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from stemdl.workloads.spacegroup import heads as T
from stemdl.workloads.spacegroup.data.index import load_or_build
from stemdl.harness.errors import DataError, StemdlError
from stemdl.harness.loop import average_loss_gradients
from stemdl.workloads.spacegroup.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore:Set OLD_ERROR_HANDLING:DeprecationWarning")

POINT_GROUP_SYSTEM = {  # point group (spglib's symbol) -> crystal system: independent of number ranges
    "1": 0, "-1": 0, "2": 1, "m": 1, "2/m": 1, "222": 2, "mm2": 2, "mmm": 2,
    "4": 3, "-4": 3, "4/m": 3, "422": 3, "4mm": 3, "-42m": 3, "4/mmm": 3,
    "3": 4, "-3": 4, "32": 4, "3m": 4, "-3m": 4,
    "6": 5, "-6": 5, "6/m": 5, "622": 5, "6mm": 5, "-6m2": 5, "6/mmm": 5,
    "23": 6, "m-3": 6, "432": 6, "-43m": 6, "m-3m": 6}


def random_lattices(rng, n):
    return np.concatenate([rng.uniform(2, 40, (n, 3)), rng.uniform(60, 120, (n, 3))], axis=1).astype(np.float32)


def test_crystal_system_and_centring_tables_match_spglib():
    standard = {}
    for hall in range(1, 531):  # the first Hall number of each space group is its standard setting
        sg = spglib.get_spacegroup_type(hall)
        standard.setdefault(sg.number, sg)
    assert sorted(standard) == list(range(1, 231))
    systems = [POINT_GROUP_SYSTEM[standard[n].pointgroup_international] for n in range(1, 231)]
    centrings = [standard[n].international_short[0] for n in range(1, 231)]
    assert T.CRYSTAL_SYSTEM_OF.tolist() == systems
    assert [T.CENTRINGS[c] for c in T.CENTRING_OF] == centrings
    assert [n + 1 for n in np.flatnonzero(T.CENTRING_OF == T.CENTRINGS.index("R"))] == [146, 148, 155, 160, 161,
                                                                                         166, 167]
    assert np.bincount(T.CRYSTAL_SYSTEM_OF).tolist() == [2, 13, 59, 68, 25, 27, 36]


def test_targets_and_the_inverse_of_the_lattice_transform():
    y = torch.tensor([0, 4, 145, 224, 228, 193])  # space groups 1 (P1), 5 (C2), 146 (R3), 225, 229, 194
    lattice = torch.tensor([[math.e, 1.0, 10.0, 90.0, 180.0, 45.0]] * 6)
    t = T.targets(y, lattice)
    assert list(t) == list(T.TASKS) == ["space_group", "lattice", "crystal_system", "centring"]
    assert t["space_group"] is y
    assert [T.CRYSTAL_SYSTEMS[i] for i in t["crystal_system"]] == ["triclinic", "monoclinic", "trigonal", "cubic",
                                                                   "cubic", "hexagonal"]
    assert "".join(T.CENTRINGS[i] for i in t["centring"]) == "PCRFIP"
    assert t["lattice"].dtype == torch.float32 and t["lattice"].shape == (6, 6)
    torch.testing.assert_close(t["lattice"][0], torch.tensor([1.0, 0.0, math.log(10), math.pi / 2, math.pi,
                                                              math.pi / 4]))
    raw = torch.from_numpy(random_lattices(np.random.default_rng(0), 100))
    torch.testing.assert_close(T.lattice_inverse(T.lattice_transform(raw)), raw, rtol=1e-6, atol=0)
    assert list(T.targets(y, lattice, ("space_group", "centring"))) == ["space_group", "centring"]


def test_parse_tasks_orders_and_validates():
    assert T.parse_tasks("space_group") == ("space_group",)
    assert T.parse_tasks(" centring, lattice ,space_group") == ("space_group", "lattice", "centring")
    assert T.parse_tasks("space_group,crystal_system,centring,lattice") == tuple(T.TASKS)
    for text, why in [("lattice", "space_group is mandatory"), ("space_group,volume", "unknown task 'volume'"),
                      ("", "unknown task ''"), ("space_group,", "unknown task ''"),
                      ("space_group,lattice,lattice", "named twice")]:
        with pytest.raises(StemdlError, match=f"^config key 'tasks': .*{why}"):
            T.parse_tasks(text)


def test_parse_task_weights():
    tasks = ("space_group", "lattice", "crystal_system")
    assert T.parse_task_weights("", tasks) == {"space_group": 1.0, "lattice": 1.0, "crystal_system": 1.0}
    assert T.parse_task_weights("lattice=0.5, crystal_system = 0.3", tasks) == {
        "space_group": 1.0, "lattice": 0.5, "crystal_system": 0.3}
    assert T.parse_task_weights("  ", tasks, "learned") == dict.fromkeys(tasks, 1.0)
    for text, why in [("lattice", "expected TASK=WEIGHT"), ("centring=1", "'centring' is not one of the tasks"),
                      ("lattice=x", "'x' is not a number"), ("lattice=-1", "must be finite and >= 0"),
                      ("lattice=nan", "must be finite"), ("lattice=1,lattice=2", "named twice")]:
        with pytest.raises(StemdlError, match=f"^config key 'task_weights': .*{why}"):
            T.parse_task_weights(text, tasks)
    with pytest.raises(StemdlError, match="only task_weighting 'fixed' takes weights"):
        T.parse_task_weights("lattice=0.5", tasks, "learned")


@pytest.mark.parametrize("name,channels", [("small_cnn", 3), ("small_cnn", 1), ("resnet18", 3), ("resnet18", 1)])
def test_head_output_shapes(name, channels):
    torch.manual_seed(0)
    model = T.MultiTaskHead(build_model(name, 230, in_channels=channels), list(T.TASKS)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, 32, 32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "space_group": (2, 230), "lattice": (2, 6), "crystal_system": (2, 7), "centring": (2, 7)}
    assert model.feature_dim == (128 if name == "small_cnn" else 512)


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_space_group_alone_reproduces_the_plain_model(name):
    torch.manual_seed(1)
    plain = build_model(name, 230, in_channels=3).eval()
    wrapped = T.MultiTaskHead(copy.deepcopy(plain), ("space_group",), feature_dim=plain.fc.in_features).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(wrapped(x)["space_group"], plain(x))
    assert [p.shape for p in wrapped.parameters()] == [p.shape for p in plain.parameters()]


def test_head_refuses_what_it_cannot_wrap():
    with pytest.raises(StemdlError, match="feature_dim 64 differs from the 128 features of SmallCNN"):
        T.MultiTaskHead(build_model("small_cnn", 230), ("space_group",), feature_dim=64)
    with pytest.raises(StemdlError, match="not a Linear with 230 outputs"):
        T.MultiTaskHead(build_model("small_cnn", 7), ("space_group",))
    with pytest.raises(StemdlError, match="no classifier registered"):
        T.MultiTaskHead(torch.nn.Linear(4, 230), ("space_group",))


def batch(rng, n=8, seed=0):
    """Outputs of all heads and the targets of n random samples."""
    torch.manual_seed(seed)
    y = torch.from_numpy(rng.integers(0, 230, n))
    lattice = torch.from_numpy(random_lattices(rng, n))
    outputs = {"space_group": torch.randn(n, 230), "lattice": torch.randn(n, 6), "crystal_system": torch.randn(n, 7),
               "centring": torch.randn(n, 7)}
    return outputs, T.targets(y, lattice), lattice


def test_fixed_weights_are_a_weighted_hand_sum():
    rng = np.random.default_rng(2)
    outputs, targets, lattice = batch(rng)
    scale = T.LatticeScale.from_lattices(random_lattices(rng, 50))
    seen = []

    def focal_like(logits, y, epoch):  # any (logits, y, epoch) -> loss serves for space_group
        seen.append(epoch)
        return 2 * F.cross_entropy(logits, y)

    weights = T.parse_task_weights("lattice=0.5,centring=0.25", tuple(T.TASKS))
    loss = T.TaskLoss(tuple(T.TASKS), "fixed", weights, lattice=scale, classification_loss=focal_like)
    total = loss(outputs, targets, epoch=3)
    parts = dict(zip(loss.tasks, (float(v.detach()) for v in loss.task_losses(outputs, targets, epoch=3))))
    mean, std = scale.tensors()
    hand = {"space_group": 2 * F.cross_entropy(outputs["space_group"], targets["space_group"]),
            "lattice": F.smooth_l1_loss(outputs["lattice"], (T.lattice_transform(lattice) - mean) / std),
            "crystal_system": F.cross_entropy(outputs["crystal_system"], targets["crystal_system"]),
            "centring": F.cross_entropy(outputs["centring"], targets["centring"])}
    assert seen == [3, 3] and list(parts) == list(T.TASKS)
    assert parts == pytest.approx({k: float(v) for k, v in hand.items()}, rel=1e-6)
    expected = hand["space_group"] + 0.5 * hand["lattice"] + hand["crystal_system"] + 0.25 * hand["centring"]
    torch.testing.assert_close(total, expected)
    assert list(loss.parameters()) == []


def test_learned_weighting_equals_the_formula_and_learns_its_log_variances():
    rng = np.random.default_rng(3)
    outputs, targets, _ = batch(rng)
    tasks = ("space_group", "crystal_system", "centring")
    loss = T.TaskLoss(tasks, "learned")
    with torch.no_grad():
        loss.log_vars.copy_(torch.tensor([0.5, -1.0, 0.0]))
    total = loss(outputs, targets)
    losses = torch.stack(loss.task_losses(outputs, targets)).detach()
    s = torch.tensor([0.5, -1.0, 0.0])
    torch.testing.assert_close(total.detach(), (torch.exp(-s) * losses + s).sum())
    total.backward()
    torch.testing.assert_close(loss.log_vars.grad, 1 - torch.exp(-s) * losses)  # d/ds (e^-s L + s)
    assert T.TaskLoss(tasks, "learned").log_vars.tolist() == [0.0, 0.0, 0.0]


def test_loss_configuration_errors():
    with pytest.raises(StemdlError, match="config key 'task_weighting': expected fixed or learned, got 'equal'"):
        T.TaskLoss(("space_group",), "equal")
    with pytest.raises(StemdlError, match="needs the LatticeScale"):
        T.TaskLoss(("space_group", "lattice"))
    with pytest.raises(StemdlError, match="only task_weighting 'fixed' takes weights"):
        T.TaskLoss(("space_group", "centring"), "learned", {"centring": 0.5})


def test_lattice_scale_standardizes_and_decodes():
    rng = np.random.default_rng(4)
    raw = random_lattices(rng, 200)
    raw[:, 3] = 90.0  # alpha never varies
    scale = T.LatticeScale.from_lattices(raw)
    values = np.concatenate([np.log(raw[:, :3].astype(np.float64)), np.deg2rad(raw[:, 3:].astype(np.float64))], 1)
    np.testing.assert_allclose(scale.mean, values.mean(0), rtol=1e-6)
    np.testing.assert_allclose(scale.std, np.where(values.std(0) > 1e-6, values.std(0), 1.0), rtol=1e-6)
    assert scale.std[3] == 1.0
    mean, std = scale.tensors()
    standardized = (T.lattice_transform(torch.from_numpy(raw)) - mean) / std
    torch.testing.assert_close(scale.decode(standardized), torch.from_numpy(raw), rtol=1e-5, atol=1e-4)
    with pytest.raises(StemdlError, match="no training samples"):
        T.LatticeScale.from_lattices(np.zeros((0, 6)))


def _split(index, rows):
    from stemdl.workloads.spacegroup.data.source import RawSplit
    from stemdl.workloads.spacegroup.preprocess import Preprocess

    return RawSplit(index, rows, Preprocess(8))


def test_lattice_scale_of_a_split_names_a_sample_that_is_no_cell(tmp_path, copy_fixture):
    root = copy_fixture(tmp_path / "data")
    index = load_or_build(root, workers=1, quiet=True, cache_dir=tmp_path / "cache")
    scale = T.lattice_scale(_split(index, index.select("train")))
    assert scale == T.LatticeScale.from_lattices(index.targets([0, 1]))
    with h5py.File(root / "dev" / "batch_dev_0.h5", "r+") as h5:
        h5["sample_0_0"].attrs["abc_angstrom"] = np.array([7.0, -1.0, 7.0])
    index = load_or_build(root, workers=1, quiet=True, cache_dir=tmp_path / "cache")
    where = f"{root.resolve() / 'dev' / 'batch_dev_0.h5'}:sample_0_0"
    with pytest.raises(DataError, match=f"^{where}: lattice \\(7, -1, 7, 90, 90, 90\\) is not a cell"):
        T.lattice_scale(_split(index, np.arange(3)))


def test_regression_errors_are_in_angstrom_and_degrees():
    rng = np.random.default_rng(5)
    true = torch.from_numpy(random_lattices(rng, 64)).double()
    delta = torch.from_numpy(rng.normal(0, [0.3, 0.3, 0.3, 2, 2, 2], (64, 6)))
    errors = T.regression_errors(T.lattice_transform(true + delta), true)
    assert list(errors) == ["a", "b", "c", "alpha", "beta", "gamma"]
    assert list(errors.values()) == pytest.approx(delta.abs().mean(0).tolist(), rel=1e-9)


def numpy_metrics(outputs, targets, lattice, mask, scale):
    keep = mask.numpy()
    ref = {f"{n}_accuracy": np.mean(outputs[n].numpy().argmax(1)[keep] == targets[n].numpy()[keep])
           for n in ("crystal_system", "centring")}
    mean, std = np.array(scale.mean), np.array(scale.std)
    values = outputs["lattice"].numpy().astype(np.float64) * std + mean
    pred = np.concatenate([np.exp(values[:, :3]), np.rad2deg(values[:, 3:])], 1)
    mae = np.abs(pred - lattice.numpy())[keep].mean(0)
    return ref | {f"lattice_mae_{n}": v for n, v in zip(T.LATTICE, mae)}


def test_metrics_match_numpy_over_batches_with_padding():
    rng = np.random.default_rng(6)
    outputs, targets, lattice = batch(rng, n=40, seed=6)
    outputs["crystal_system"][:20] = F.one_hot(targets["crystal_system"][:20], 7) * 5.0  # some right answers
    mask = torch.from_numpy(rng.random(40) < 0.8)
    scale = T.LatticeScale.from_lattices(lattice.numpy())
    metrics = T.TaskMetrics(tuple(T.TASKS), scale)
    for part in (slice(0, 25), slice(25, 40)):
        metrics.update({k: v[part] for k, v in outputs.items()}, {k: v[part] for k, v in targets.items()},
                       mask[part])
    assert metrics.all_reduce() is metrics and metrics.samples == int(mask.sum())
    assert metrics.results() == pytest.approx(numpy_metrics(outputs, targets, lattice, mask, scale), rel=1e-5)
    assert metrics.results()["crystal_system_accuracy"] > 0.4
    with pytest.raises(RuntimeError, match="called twice"):
        metrics.all_reduce()
    with pytest.raises(RuntimeError, match="after all_reduce"):
        metrics.update(outputs, targets)
    assert T.TaskMetrics(("space_group", "centring")).results() == {"centring_accuracy": 0.0}


def test_views_average_task_by_task():
    a = {"space_group": torch.zeros(2, 230, dtype=torch.bfloat16), "lattice": torch.ones(2, 6)}
    b = {"space_group": torch.ones(2, 230), "lattice": 3 * torch.ones(2, 6)}
    mean = T.average_outputs([a, b])
    assert mean["space_group"].dtype == torch.float32 and mean["space_group"].unique().tolist() == [0.5]
    assert mean["lattice"].unique().tolist() == [2.0]


def _rank_main(rank, store_path, out_path):
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    rng = np.random.default_rng(7)
    outputs, targets, lattice = batch(rng, n=30, seed=7)
    scale = T.LatticeScale.from_lattices(lattice.numpy())
    mine = slice(0, 11) if rank == 0 else slice(11, 30)  # uneven shares
    metrics = T.TaskMetrics(tuple(T.TASKS), scale)
    metrics.update({k: v[mine] for k, v in outputs.items()}, {k: v[mine] for k, v in targets.items()})
    loss = T.TaskLoss(("space_group", "centring"), "learned")
    loss.log_vars.grad = torch.tensor([1.0, 2.0]) * (rank + 1)
    average_loss_gradients(loss, 2)  # the harness's, for any loss that learns
    torch.save({"results": metrics.all_reduce().results(), "grad": loss.log_vars.grad}, f"{out_path}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_sum_metrics_and_average_log_variance_gradients(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    outputs, targets, lattice = batch(np.random.default_rng(7), n=30, seed=7)
    expected = numpy_metrics(outputs, targets, lattice, torch.ones(30, dtype=torch.bool),
                             T.LatticeScale.from_lattices(lattice.numpy()))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"out.{rank}")
        assert got["results"] == pytest.approx(expected, rel=1e-5)
        assert got["grad"].tolist() == [1.5, 3.0]


def test_single_process_reductions_are_noops():
    loss = T.TaskLoss(("space_group", "centring"), "learned")
    loss.log_vars.grad = torch.tensor([1.0, 2.0])
    average_loss_gradients(loss, 1)
    assert loss.log_vars.grad.tolist() == [1.0, 2.0]
    average_loss_gradients(T.TaskLoss(("space_group",)), 2)  # fixed weights: nothing to average


@pytest.fixture
def one_thread():
    """One torch thread: with other tests or jobs on the cores, two threads mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_thirty_steps_of_small_cnn_with_all_heads_reduce_the_loss(one_thread):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = torch.randn(16, 3, 16, 16)
    lattice = torch.from_numpy(random_lattices(rng, 16))
    y = torch.from_numpy(rng.choice([0, 13, 61, 138, 165, 193, 224], 16))  # P1 .. Fm-3m, 7 crystal systems
    model = T.MultiTaskHead(build_model("small_cnn", 230, dropout=0.0), tuple(T.TASKS))
    loss_fn = T.TaskLoss(tuple(T.TASKS), "learned", lattice=T.LatticeScale.from_lattices(lattice.numpy()))
    optimizer = torch.optim.AdamW([{"params": model.parameters()},
                                   {"params": loss_fn.parameters(), "weight_decay": 0.0}], lr=3e-3)
    target = T.targets(y, lattice)
    history = []
    for _ in range(30):
        outputs = model(x)
        total = loss_fn(outputs, target)
        parts = dict(zip(loss_fn.tasks, (float(v.detach()) for v in loss_fn.task_losses(outputs, target))))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        history.append(parts)
    for name in T.TASKS:
        assert history[-1][name] < 0.5 * history[0][name], name
    assert loss_fn.log_vars.grad is not None and loss_fn.log_vars.abs().sum() > 0

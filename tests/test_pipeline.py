"""The two torch pipelines behind the factory give the same batches for the same seed and epoch."""

from dataclasses import dataclass

import pytest
import torch

from stemdl.config import load_config
from stemdl.data.index import load_or_build
from stemdl.errors import StemdlError
from stemdl.pipeline import PIPELINES, build_pipeline
from stemdl.synth import generate


@dataclass(frozen=True)
class Env:
    rank: int = 0
    world_size: int = 1


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "tiny"
    generate.generate(out, generate.preset_config("tiny", seed=3), quiet=True)
    return load_or_build(out, workers=1, quiet=True)


def test_memory_and_stream_give_the_same_batches(index):
    cfg = load_config("smoke", {"batch_size": 2})
    memory, stream = (build_pipeline(name, index, cfg, Env()) for name in ("memory", "stream"))
    for epoch in (1, 2):
        a, b = list(memory.train_batches(epoch)), list(stream.train_batches(epoch))
        assert len(a) == len(b) == memory.steps_per_epoch == 4
        for (xa, ya), (xb, yb) in zip(a, b):
            assert xa.dtype == torch.uint8 and xa.shape == (2, 3, cfg.image_size, cfg.image_size)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert [y.tolist() for _, y in memory.train_batches(1)] != [y.tolist() for _, y in memory.train_batches(2)]
    for (xa, ya, ma), (xb, yb, mb) in zip(memory.eval_batches(), stream.eval_batches()):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ma, mb)


def test_ranks_split_the_validation_set_exactly_once(index):
    cfg = load_config("smoke", {"batch_size": 3})
    seen = []
    for rank in range(2):
        pipe = build_pipeline("memory", index, cfg, Env(rank, 2))
        for _, y, mask in pipe.eval_batches():
            seen.extend(y[mask].tolist())
    assert sorted(seen) == sorted((index.label[index.select("dev")] - 1).tolist())


def test_unknown_pipeline_and_too_little_data(index):
    assert set(PIPELINES) == {"memory", "stream"}
    with pytest.raises(StemdlError, match="pipeline"):
        build_pipeline("dali", index, load_config("smoke"), Env())
    with pytest.raises(StemdlError, match="cannot fill one batch"):
        build_pipeline("memory", index, load_config("smoke", {"batch_size": 8}), Env(0, 2))

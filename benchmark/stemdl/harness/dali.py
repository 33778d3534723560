"""The DALI input pipeline: a split's input in the harness's order, as torch tensors, normalized by DALI on a GPU.

    feed = DaliBatches(split, 64, device_id=env.local_rank,        # device_id=None: DALI's CPU ops
                       normalization=workload.input_normalization)
    for x, fields in feed.epoch(sharding.train_shard(len(split), seed, epoch, rank, world, 64)): ...
    for x, fields, mask in feed.epoch(*sharding.eval_shard(len(split), rank, world, 64)): ...

On a GPU, x and fields are on cuda:device_id, and x is float32 of the split's input shape, normalized
with the workload's (mean, std) (`Workload.input_normalization`; `normalized` is True). On the CPU, or
with no normalization given, x keeps the stored uint8 or float16 values (0..255) and the step normalizes,
as for the torch pipelines. mask (False on evaluation padding) stays on the CPU. `split` is as in
`stemdl.harness.pipelines`.

The order is the harness's, never DALI's: one batch-mode external_source reads the next `group` batches of
the order with one `split.read`, and a DALI sample is a whole training batch, because DALI's cost is per
run and per sample. Only the input goes through DALI; the harness takes each batch's fields. Why, what it
costs, and why DALI's parallel source and GPU Direct Storage are not offered: docs/performance.md.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from stemdl.harness.errors import StemdlError

INSTALL_HINT = ("pipeline 'dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                "(or the -cuda120 wheel matching your CUDA)")
IMAGE_DTYPES = ("uint8", "float16")  # what the shards store; values 0..255 either way
GROUP_BYTES = 4 << 20  # images per DALI run (whole training batches, at least one): DALI's fixed cost per
# run (~0.1-0.3 ms) is shared among the batches of a run, while larger runs cost more than they save (measured
# on 2 cores: 64x64 uint8 batches of 64 run best 5-8 to a run, 128x128 ones 1 to a run)


def _import_dali():
    """DALI's modules, imported only when a DALI pipeline is built (the package is an optional extra)."""
    try:
        from nvidia.dali import Pipeline, fn, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as exc:
        raise StemdlError(INSTALL_HINT) from exc
    return Pipeline, fn, types, DALIGenericIterator, LastBatchPolicy


def _check_device(device_id: int | None) -> None:
    if device_id is None:
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not 0 <= device_id < visible:
        raise StemdlError(f"pipeline 'dali': GPU {device_id} requested but {visible} GPU(s) visible "
                          f"(check CUDA_VISIBLE_DEVICES and the CUDA build of torch)")


class _Feed:
    """The external_source callback: the next group of batches of the current order, StopIteration after the
    last. DALI calls it from the thread that runs the iterator, so its state needs no lock."""

    def __init__(self, split, batch_size: int, group: int, keep: int):
        self.split, self.batch_size, self.group = split, batch_size, group
        self.order = np.empty(0, dtype=np.int64)
        self.next_batch = 0
        # no_copy: DALI reads what the source returns in place, for up to `prefetch` runs after. A split that
        # reads into a given buffer (shards) fills a ring of `keep` buffers, reused: a fresh 3-25 MB array per
        # run cost more in page faults than its copy (measured at 128x128, batch 64, a batch a run: 50k samples/s
        # with fresh arrays, 170k with the ring). Other splits: their last `keep` arrays are kept alive.
        self.into = bool(getattr(split, "reads_into", False))
        self.ring: list = [None] * keep
        self.slot = 0

    def start(self, order: np.ndarray) -> None:
        self.order, self.next_batch = order, 0

    def stop(self) -> None:
        """Every later call ends the epoch: what the pipeline already read is all that is left."""
        self.order = self.order[:0]

    def __call__(self):
        start = self.next_batch * self.batch_size
        if start >= len(self.order):
            raise StopIteration
        rows = self.order[start:start + self.group * self.batch_size]
        batches = len(rows) // self.batch_size
        self.next_batch += batches
        if self.into:
            images = self.ring[self.slot]
            shape = (len(rows), *self.split.image_shape)
            if images is None or images.shape != shape:
                images = np.empty(shape, dtype=self.split.dtype)
            self.split.read(rows, out=images)  # one gather for the whole group
        else:
            images = np.ascontiguousarray(self.split.read(rows))
        self.ring[self.slot], self.slot = images, (self.slot + 1) % len(self.ring)
        return images.reshape(batches, self.batch_size, *images.shape[1:])  # DALI's batch: a sample per batch


class DaliBatches:
    """Batches of a split in a given order, read by a DALI external_source (and normalized by DALI on a GPU)."""

    def __init__(self, split, batch_size: int, device_id: int | None, num_threads: int = 2,
                 prefetch: int = 2, seed: int = 0, normalize: bool | None = None, group: int | None = None,
                 normalization: tuple[float, float] | None = None):
        self._dali = _import_dali()
        dtype = np.dtype(split.dtype)
        if dtype.name not in IMAGE_DTYPES:
            raise StemdlError(f"pipeline 'dali': images are {dtype.name}, need one of {', '.join(IMAGE_DTYPES)}")
        if len(split.image_shape) != 3:
            raise StemdlError(f"pipeline 'dali': inputs of shape {tuple(split.image_shape)} are not (C, H, W) images")
        if normalize and normalization is None:
            raise StemdlError("pipeline 'dali': normalizing needs the workload's (mean, std) of x / 255")
        if min(batch_size, num_threads, prefetch, 1 if group is None else group) < 1:
            raise StemdlError(f"pipeline 'dali': batch_size ({batch_size}), num_threads ({num_threads}), "
                              f"prefetch ({prefetch}) and group ({group}) must be 1 or more")
        if group is None:
            group = max(1, GROUP_BYTES // (batch_size * int(np.prod(split.image_shape)) * dtype.itemsize))
        _check_device(device_id)
        self.split, self.batch_size, self.device_id = split, batch_size, device_id
        self._settings = {"num_threads": num_threads, "prefetch_queue_depth": prefetch, "seed": seed}
        self._image_type = dtype.name
        # False: x holds the stored values and the step normalizes. None: DALI normalizes on a GPU only, if the
        # workload gave its normalization (True on the CPU runs the GPU path's normalization on DALI's CPU ops,
        # which is how the tests check it). normalization: (mean, std) of x / 255.
        self.normalization = normalization
        wanted = device_id is not None if normalize is None else bool(normalize)
        self.normalized = wanted and normalization is not None
        self._device = None if device_id is None else torch.device("cuda", device_id)
        self.group = group
        self.read_ahead = prefetch * group  # batches read before an epoch's first is handed over
        self._feed = _Feed(split, batch_size, group, keep=prefetch + 2)
        self._generation = 0  # bumped by every epoch(): an older epoch's iterator may no longer pull
        start = time.perf_counter()
        self._build()
        self.build_s = time.perf_counter() - start  # what building the pipeline cost (reported by benchmarks)

    def _build(self) -> None:
        Pipeline, fn, types, DALIGenericIterator, LastBatchPolicy = self._dali
        pipe = Pipeline(batch_size=self.group, device_id=self.device_id, **self._settings)
        image_type = types.UINT8 if self._image_type == "uint8" else types.FLOAT16
        with pipe:
            # A sample is one training batch: F (frames) is the batch, each image CHW.
            x = fn.external_source(self._feed, batch=True, layout="FCHW", dtype=image_type, ndim=4, no_copy=True)
            if self.device_id is not None:
                x = x.gpu()
            if self.normalized:
                # (u - 255 m) / (255 s) = (u / 255 - m) / s: the workload's normalization, in one DALI kernel.
                mean, std = self.normalization
                x = fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="FCHW",
                                             mean=mean * 255.0, std=std * 255.0)
            pipe.set_outputs(x)
        pipe.build()
        # The end of an epoch is the source's StopIteration (size -1), never a count; nothing runs until the
        # first epoch asks, so no batch is read before an order is set.
        self._iter = DALIGenericIterator(pipe, ["x"], last_batch_policy=LastBatchPolicy.PARTIAL,
                                         prepare_first_batch=False)
        self._scheduled = False  # the pipeline has run: the next epoch must reset it first
        self._pending = False  # an epoch's batches may still sit in the pipeline
        self._broken = False

    def epoch(self, order: np.ndarray, mask: np.ndarray | None = None):
        """Iterate batches of `order` (len a multiple of batch_size) in order: (x, fields) torch tensors, plus
        mask (bool (B,)) as a 3rd item when mask is given (evaluation). Abandoning the iteration is safe:
        the next epoch() starts cleanly. Only the iterator of the latest epoch() may be used."""
        order = np.asarray(order, dtype=np.int64)
        if len(order) % self.batch_size:
            raise StemdlError(f"pipeline 'dali': {len(order)} samples are not whole batches of {self.batch_size}")
        if mask is not None and len(mask) != len(order):
            raise StemdlError(f"pipeline 'dali': mask of {len(mask)} for {len(order)} samples")
        self._settle()
        self._feed.start(order)
        if self._scheduled:
            try:
                self._iter.reset()  # runs the source at once: the first `prefetch` batches are read here
            except BaseException:
                self._broken = True
                raise
        self._scheduled = self._pending = True
        self._generation += 1
        mask = None if mask is None else torch.from_numpy(np.asarray(mask, dtype=bool))
        return self._batches(self._generation, order, mask)

    def _settle(self) -> None:
        """Leave the pipeline ready for a new order: rebuilt after an error, emptied after an abandoned epoch."""
        if self._broken:
            self._build()
        elif self._pending:
            self._feed.stop()
            try:
                while True:
                    next(self._iter)
            except StopIteration:
                self._pending = False
            except Exception:  # a batch nobody wants any more failed: start afresh
                self._build()

    def _batches(self, generation: int, order: np.ndarray, mask: torch.Tensor | None):
        b, k = self.batch_size, 0
        while True:
            if generation != self._generation:
                raise RuntimeError("DaliBatches: an epoch iterator was used after a newer epoch() started")
            try:
                group = next(self._iter)[0]["x"]  # (batches, B, 3, S, S)
            except StopIteration:  # the source's: the order is exhausted
                self._pending = False
                return
            except BaseException:
                self._broken = True  # e.g. a DataError from split.read: DALI's state is unknown, rebuild
                raise
            for x in group:
                if generation != self._generation:
                    raise RuntimeError("DaliBatches: an epoch iterator was used after a newer epoch() started")
                rows = order[k * b:(k + 1) * b]
                fields = tuple(torch.from_numpy(values[rows]) for values in self.split.fields.values())
                if self._device is not None:
                    fields = tuple(f.to(self._device, non_blocking=True) for f in fields)
                batch = (x, fields)
                yield batch if mask is None else batch + (mask[k * b:(k + 1) * b],)
                k += 1

"""Under `mpiexec -n 2`: the reconstruction evaluator's MAE against the MAE of every prediction gathered
in one place (uneven shares, padded batches), on data the ranks generate together.

    mpiexec -n 2 python tests/reconstruction/mae_check.py DATA OUT.json
"""

import json
import sys

import numpy as np
import torch

from stemdl.harness import config, dist, loop
from stemdl.harness.pipelines import build_pipeline
from stemdl.harness.workload import StepContext
from stemdl.workloads import REGISTRY


def main(data: str, out: str) -> None:
    env = dist.setup(backend="gloo", device="cpu")
    try:
        workload = REGISTRY["stemdl_reconstruction"]
        cfg = config.load_config(workload, "smoke", {"data": data, "batch_size": 2})
        root = workload.ensure_data(cfg, env)  # a fresh folder: both ranks write it, each its own files
        prepared = workload.prepare(root, cfg, env, log=None)
        torch.manual_seed(3)  # the same weights on both ranks, as the harness's seed makes them
        built = workload.build(cfg, prepared)
        model = built.model.to(memory_format=torch.channels_last)  # as the harness places it
        pipe = build_pipeline("memory", prepared.train, prepared.eval, cfg, env)
        evaluation = loop.evaluate(model, pipe, built.evaluator(StepContext(cfg, env, normalized=False)))
        mine = pipe.eval_indices[pipe.eval_mask]
        with torch.no_grad():
            x = torch.from_numpy(prepared.eval.read(mine)).float().contiguous(memory_format=torch.channels_last)
            predictions = model(x).numpy()
        gathered = dist.allgather_object((mine, predictions, int(len(pipe.eval_mask))))
        if env.is_root:
            order = np.concatenate([rows for rows, _, _ in gathered])
            error = (np.concatenate([p for _, p, _ in gathered]).astype(np.float64)
                     - prepared.eval.fields["potential"].astype(np.float64)[order])
            result = {"mae": evaluation["mae"], "rmse": evaluation["rmse"], "samples": evaluation.details["samples"],
                      "gathered_mae": float(np.abs(error).mean()), "gathered_rmse": float(np.sqrt((error**2).mean())),
                      "order": order.tolist(), "shares": [len(rows) for rows, _, _ in gathered],
                      "padded": [n for _, _, n in gathered], "world_size": env.world_size}
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        dist.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""How hard does each task's loss pull on the shared trunk? Gradient norms by task and loss part.

    PYTHONPATH=. python results/levers16k/task_gradients.py ROW=CHECKPOINT [ROW=CHECKPOINT ...]

AdamW divides each weight's step by the root of its running mean squared gradient, summed over
everything the step trains. A trunk weight that the VQA loss pulls on hard therefore takes only
a small step for a loss that pulls on it softly, however consistent that loss's pull. This
measures the pulls: for each task's stream (VQA, the T2I families, their full-scene captions
alone, simple edits), 8 training micro-batches of 32 samples (seed 123, not the runs' seed 0),
and for each loss part the task has (the answer CE, the flow MSE, the per-cell heads), the
L2 norm of its gradient over the trunk's blocks, one micro-batch at a time (median over the 8),
with the part's weight in the model's config (`ce_weight`, `flow_weight`, ...), the EMA weights
and training mode (condition dropouts on). The flow noise is the same for every part of a batch.
"""
import dataclasses
import statistics
import sys

import torch

import model as M
import train as T

STREAMS = ("vqa", "t2i", "scene", "edit")
PARTS = {"ce": "ce_weight", "flow": "flow_weight", "gen_cells": "gen_cell_weight",
         "sem_cells": "sem_cell_weight"}
OTHER_WEIGHTS = ("layout_weight",)  # a loss not reported here, held at 0 for every part
BATCHES = 8


def trunk_grad_norm(model, batch, noise, part):
    """Norm of the trunk's gradient of one loss part (at its configured weight), or None when the
    batch has no such part."""
    full = model.cfg
    only = {key: (getattr(full, key) if p == part else 0.0) for p, key in PARTS.items()}
    only.update(dict.fromkeys(OTHER_WEIGHTS, 0.0))
    model.cfg = dataclasses.replace(full, **only)
    try:
        model.zero_grad(set_to_none=True)
        total, parts = model.loss(batch, noise)
        if part not in parts or not torch.is_tensor(total) or not total.requires_grad:
            return None
        total.backward()
    finally:
        model.cfg = full
    grads = [p.grad.flatten() for name, p in model.named_parameters()
             if name.startswith("blocks.") and p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


def main(args):
    print("| row | stream | " + " | ".join(f"{p} (trunk grad norm)" for p in PARTS) + " |")
    print("| --- | --- |" + " --- |" * len(PARTS))
    for arg in args:
        row, path = arg.split("=", 1)
        model, tok, meta = M.load_checkpoint(path)
        model.train()
        cfg = T.TrainConfig(micro_batch=32, seed=123, world=meta["world"]["name"])
        torch.manual_seed(123)
        for stream in STREAMS:
            norms = {p: [] for p in PARTS}
            data = T.Stream(cfg, f"{stream}:1", tok, model.cfg)
            for c in range(BATCHES):
                batch = data[c]
                noise = model.draw_noise(batch)
                for p in PARTS:
                    n = trunk_grad_norm(model, batch, noise, p)
                    if n is not None:
                        norms[p].append(n)
            cells = [f"{statistics.median(v):.3f}" if v else "-" for v in norms.values()]
            print(f"| {row} | {stream} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

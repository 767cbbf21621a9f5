"""Does an edit place what its instruction names without its source image?

    PYTHONPATH=. python results/levers16k/source_frame.py CHECKPOINT [...]

The 200 val add edits of eval.placement_probe, at t = 1 (pure noise): the share whose added
object the gen_cells head names exactly (shape, colour, size in the named cell), with both
source conditions kept, with only the semantic source tokens, with only the clean pixel source,
and with neither (as the unconditional terms of guidance drop them). EMA weights, text kept.
"""
import sys

import torch

import eval as ev
import model as M

for path in sys.argv[1:]:
    model, tok, meta = M.load_checkpoint(path)
    samples, named = ev.placement_sets(meta["world"]["name"], "val", 200)["add"]
    batch = M.collate(samples, model.cfg, tok)["edit"]
    B, x0 = len(samples), M.patchify(batch["target"], model.cfg.patch)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    on, off = torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)
    print(path)
    for name, sem, pix in (("both", on, on), ("semantic only", on, off), ("pixels only", off, on),
                           ("neither", off, off)):
        pred = ev.cells_named(model, "edit", batch, eps, 1.0, sem, pix)
        right = (pred == batch["target_cells"]).all(-1)[named].float().mean()
        print(f"  source kept: {name:<14} added object named at t = 1: {right:.3f}")

"""Does an edit place what its instruction names without its source image?

    PYTHONPATH=. python results/levers16k/source_frame.py CHECKPOINT [...]

The 200 val add edits of eval.placement_probe, at t = 1 (pure noise): the share whose added
object the gen_cells head names exactly (shape, colour, size in the named cell), with both
source conditions kept, with only the semantic source tokens, with only the clean pixel source,
and with neither (as the unconditional terms of guidance drop them); then the same with a blank
source image (no object at all) in place of each edit's own. EMA weights, text kept.
"""
import sys

import numpy as np
import torch

import eval as ev
import model as M

for path in sys.argv[1:]:
    model, tok, meta = M.load_checkpoint(path)
    samples, named = ev.placement_sets(meta["world"]["name"], "val", 200)["add"]
    truth = M.collate(samples, model.cfg, tok)["edit"]["target_cells"]
    blank = np.zeros_like(samples[0]["image"])
    B = len(samples)
    on, off = torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)
    print(path)
    for source, given in (("own", samples), ("blank", [{**s, "image": blank, "scene": []}
                                                      for s in samples])):
        batch = M.collate(given, model.cfg, tok)["edit"]
        x0 = M.patchify(batch["target"], model.cfg.patch)
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        for name, sem, pix in (("both", on, on), ("semantic only", on, off),
                               ("pixels only", off, on), ("neither", off, off)):
            if source == "blank" and name == "neither":
                continue  # the same run as the own source's: no source is seen
            pred = ev.cells_named(model, "edit", batch, eps, 1.0, sem, pix)
            right = (pred == truth).all(-1)[named].float().mean()
            print(f"  {source + ' source':<12} kept: {name:<14} "
                  f"added object named at t = 1: {right:.3f}")

"""Can the edit path place a caption's objects where the T2I path cannot?

    PYTHONPATH=. python results/levers16k/caption_as_edit.py CHECKPOINT [...]

150 val full-scene captions of one or two objects (short enough for the edit's text slot), each
given twice: as the T2I prompt it is, and as an edit of a blank source image with the caption as
the instruction. As in eval.placement_probe, the target is noised to time t and the gen_cells
head names every cell from the trunk's outputs at the noisy image (EMA weights, every condition
kept); at t = 1 the image is pure noise. Printed: the share of the caption's objects named
exactly (shape, colour, size), for each path and t.
"""
import sys

import numpy as np
import torch

import eval as ev
import model as M
import synth

for path in sys.argv[1:]:
    model, tok, meta = M.load_checkpoint(path)
    cfg = model.cfg
    world = meta["world"]["name"]
    captions, i = [], 0
    while len(captions) < 150:
        s = synth.make_sample(world, "t2i", "val", i)
        i += 1
        if (s["family"] == "scene" and len(s["target_scene"]) <= 2
                and len(tok.encode(s["text"]).ids) <= cfg.edit_text):
            captions.append(s)
    blank = np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8)
    as_edits = [{**s, "task": "edit", "image": blank, "scene": []} for s in captions]
    print(path)
    for name, group, samples in (("T2I path", "t2i", captions),
                                 ("edit path, blank source", "edit", as_edits)):
        batch = M.collate(samples, cfg, tok)[group]
        truth = batch["target_cells"]  # (B, N, 3), 0 = empty
        x0 = M.patchify(batch["target"], cfg.patch)
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        for t in (1.0, 0.9):
            pred = ev.cells_named(model, group, batch, (1 - t) * x0 + t * eps, t)
            named = (pred == truth).all(-1)[truth[..., 0] > 0].float().mean()
            print(f"  {name:<24} t = {t}: objects named right {named:.3f}")

"""The placement probe (eval.placement_probe) of several checkpoints, as one table.

    PYTHONPATH=. python results/levers16k/placement.py ROW=CHECKPOINT [ROW=CHECKPOINT ...]

Each row: a checkpoint's share of named cells (shape, colour and size all right) that its
gen_cells head reads off the trunk at the noisy image, for 200 val full-scene captions (every
object's cell) and 200 val add edits (the added object's cell), at noise times t = 1 (pure
noise: the text and an edit's source alone), 0.9 and 0.75; and the share of all cells called
empty or not rightly at t = 1 beside calling every cell empty (chance).
"""
import sys

import eval as ev
import model as M

print("| row | step | full-scene objects, t = 1 | t = 0.9 | t = 0.75 | full-scene occupancy, t = 1 "
      "(chance) | add: new object, t = 1 | t = 0.9 | add occupancy, t = 1 (chance) |")
print("| --- |" + " --- |" * 8)
for arg in sys.argv[1:]:
    row, path = arg.split("=", 1)
    model, tok, meta = M.load_checkpoint(path)
    p = ev.placement_probe(model, tok, meta["world"]["name"])
    s, a = p["scene"], p["add"]
    cells = [f"{s['by_t'][t]['objects']:.3f}" for t in ("1.0", "0.9", "0.75")]
    cells.append(f"{s['by_t']['1.0']['occupancy']:.3f} ({s['chance']:.3f})")
    cells += [f"{a['by_t'][t]['objects']:.3f}" for t in ("1.0", "0.9")]
    cells.append(f"{a['by_t']['1.0']['occupancy']:.3f} ({a['chance']:.3f})")
    print(f"| {row} | {meta['step']} | " + " | ".join(cells) + " |", flush=True)

"""Which tokens know which cell they stand for? Linear probes of the trunk's states at t = 1.

    PYTHONPATH=. python results/levers16k/cell_identity.py CHECKPOINT [...]

To place "a small white square in row 1, column 3" from pure noise, the noisy token of cell (1, 3)
must find the words that name its cell. For that two things must be readable: which cell each
noisy token is, and which cell each mention in the text names. Each row is a linear probe (a
softmax over the 16 cells, fitted on the first 100 of eval.placement_sets' 200 val items and
scored on the other 100) of the trunk's input vectors (L0) and of each block's outputs (L1 ...):
- noisy tokens, T2I full-scene captions / add edits with their source / add edits without it:
  the token's own cell, with the target noised to t = 1 (the same noise for every run);
- source tokens of the add edits (semantic, clean pixels): the token's own cell;
- text: the state at the number after each "column" of a caption or add instruction, or at the
  token after it, whichever reads better: the cell that mention names ("row r, column c").
Chance is 1/16 = 0.06 for the token rows; for the text rows about as much (the cells are
drawn uniformly). EMA weights; every condition kept unless a row says otherwise.
"""
import re
import sys

import torch
import torch.nn.functional as F

import eval as ev
import model as M


def probe(features, cells):
    """Held-out accuracy of a linear softmax probe: features (B, K, C) -> cells (B, K), fitted
    on the first half of the B items, scored on the second."""
    B, K, C = features.shape
    x = F.layer_norm(features.float(), (C,))
    n = B // 2
    fit, held = (x[:n].reshape(-1, C), cells[:n].reshape(-1)), (x[n:].reshape(-1, C),
                                                                cells[n:].reshape(-1))
    w = torch.zeros(C, 16, requires_grad=True)
    b = torch.zeros(16, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(300):
        loss = F.cross_entropy(fit[0] @ w + b, fit[1]) + 1e-4 * w.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(((held[0] @ w + b).argmax(-1) == held[1]).float().mean())


def trunk_states(model, group, batch, keep):
    """The trunk's input (B, T, C) and every block's output at t = 1 (pure noise)."""
    outs = []
    hooks = [blk.register_forward_hook(lambda mod, inp, out: outs.append(out))
             for blk in model.blocks]
    x0 = M.patchify(batch["target"], model.cfg.patch)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    B = x0.shape[0]
    on, kept = torch.ones(B, dtype=torch.bool), torch.full((B,), keep)
    with torch.no_grad():
        x = model.velocity_patches(group, batch, eps, torch.ones(B), on, kept, kept)[1]
    for h in hooks:
        h.remove()
    return [x] + outs


for path in sys.argv[1:]:
    model, tok, meta = M.load_checkpoint(path)
    sets = ev.placement_sets(meta["world"]["name"], "val", 200)
    column = tok.token_to_id("\u2581column")  # the tokenizer's word "column"
    rows = []
    for name, group, set_name, keep in (("T2I captions", "t2i", "scene", True),
                                        ("add edits", "edit", "add", True),
                                        ("add edits, no source", "edit", "add", False)):
        samples, _ = sets[set_name]
        batch = M.collate(samples, model.cfg, tok)[group]
        states = trunk_states(model, group, batch, keep)
        L = model.layouts[group]
        own = torch.arange(model.n).expand(len(samples), -1)  # each token's own cell
        rows.append((f"noisy tokens, {name}", [probe(s[:, L.noisy], own) for s in states]))
        if set_name == "add" and keep:
            for part in ("sem", "clean"):
                rows.append((f"source tokens ({part}), add edits",
                             [probe(s[:, getattr(L, part)], own) for s in states]))
        if keep:  # the text: each mention's cell, at the number after "column"
            where, cells = [], []
            for i, s in enumerate(samples):
                at = (batch["tokens"][i] == column).nonzero().flatten().tolist()
                named = re.findall(r"row (\d+), column (\d+)", s["text"])
                assert len(at) == len(named), s["text"]
                for p, (r, c) in zip(at, named):
                    where.append((i, p + 1))
                    cells.append((int(r) - 1) * model.cfg.cells + int(c) - 1)  # 1-based in text
            idx, pos = torch.tensor(where).T
            named = torch.tensor(cells)[:, None]
            rows.append((f"text at each cell mention, {name}",  # the better of the two tokens
                         [max(probe(s[idx, pos][:, None], named),
                              probe(s[idx, pos + 1][:, None], named)) for s in states]))
    print(f"{path} (step {meta['step']})")
    for name, accs in rows:
        print(f"  {name:<40} " + " ".join(f"L{i} {a:.2f}" for i, a in enumerate(accs)))

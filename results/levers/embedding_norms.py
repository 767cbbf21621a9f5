"""How large a checkpoint's row/column embeddings are against the tokens they are added to.

    PYTHONPATH=. python results/levers/embedding_norms.py out/RUN/step_006000 [...]

For each checkpoint (EMA weights): the mean norm of a cell's position part (row + column
embedding) of the semantic tokens (sem_pos) and of the pixel tokens (pix_pos), and the mean norm
of what they are added to: the adapter's output on 256 val VQA images, and a noisy token's
pixel projection at t = 1 (pure noise), where the position is all a token has to go on.
"""
import sys

import torch

import model as M
import synth

torch.manual_seed(0)
world = synth.get_world("tiny")
images = torch.stack([torch.as_tensor(synth.make_sample(world, "vqa", "val", i)["image"])
                      for i in range(256)]).permute(0, 3, 1, 2).float() / 127.5 - 1
for path in sys.argv[1:]:
    model, _, _ = M.load_checkpoint(path)
    with torch.no_grad():
        sem_pos, pix_pos = M.grid(model.sem_pos), M.grid(model.pix_pos)  # (N, C) each
        content = model.semantic_tokens(images) - sem_pos  # (B, N, C): the adapter's output
        noise = torch.randn(256, model.n, 3 * model.cfg.patch ** 2)
        noisy = model.pix_in(noise)  # (B, N, C): a noisy token at t = 1, before its position
    print(f"{path}: sem_pos {sem_pos.norm(dim=-1).mean():.2f} vs semantic content "
          f"{content.norm(dim=-1).mean():.2f}; pix_pos {pix_pos.norm(dim=-1).mean():.2f} vs "
          f"noise at t = 1 {noisy.norm(dim=-1).mean():.2f}")

# What the host spends on one training step, measured on the CPU (README, "On a GPU"):
# the aten ops one eager forward + backward of a micro-batch dispatches (and the host syncs among
# them, counted by torch.profiler), and how long one core takes to make that micro-batch
# (synthesis + collate, as a data worker does). Run from the repository root:
#   OMP_NUM_THREADS=1 PYTHONPATH=. python results/h200/host_costs.py
import time
import torch
from torch.profiler import ProfilerActivity, profile
import synth, train
from model import UMM

torch.set_num_threads(1)
for argv in (["--batch_size=256", "--micro_batch=256"], ["--preset=small"]):
    cfg = train.parse_args(argv + ["--device=cpu"])
    tok = synth.get_tokenizer(cfg.world)
    mcfg = train.model_config(cfg, tok.get_vocab_size())
    stream = train.Stream(cfg, train.RECIPES[cfg.recipe]["stages"][0][1], tok, mcfg)
    batch = stream[0]
    ms = []
    for c in range(1, 4):
        t = time.perf_counter()
        stream[c]
        ms.append((time.perf_counter() - t) * 1000)
    model = UMM(mcfg)
    model(batch, model.draw_noise(batch))[0].backward()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(batch, model.draw_noise(batch))[0].backward()
    ops = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
    print(f"{' '.join(argv) or 'tiny'}: micro-batch {cfg.micro_batch}, made by one core in "
          f"{sorted(ms)[1]:.0f} ms (median of 3); forward + backward dispatches "
          f"{sum(ops.values())} aten ops, {ops.get('aten::_local_scalar_dense', 0)} host syncs")

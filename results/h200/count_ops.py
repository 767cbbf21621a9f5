# The ops one eager forward + backward of a micro-batch dispatches (tiny, 32 samples; small, 64),
# and the host syncs among them, counted by torch.profiler on the CPU. Run from the repo root:
#   OMP_NUM_THREADS=1 PYTHONPATH=. python results/h200/count_ops.py
import torch, synth, train
from model import UMM
torch.set_num_threads(1)
for argv in ([], ["--preset=small"]):
    cfg = train.parse_args(argv + ["--device=cpu"])
    tok = synth.get_tokenizer(cfg.world)
    mcfg = train.model_config(cfg, tok.get_vocab_size())
    model = UMM(mcfg)
    mix = train.RECIPES[cfg.recipe]["stages"][0][1]
    s = train.Stream(cfg, mix, tok, mcfg)
    batch = s[0]
    noise = model.draw_noise(batch)
    loss, parts = model(batch, noise); loss.backward()
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        noise = model.draw_noise(batch)
        loss, parts = model(batch, noise); loss.backward()
    ev = prof.key_averages()
    total = sum(e.count for e in ev if e.key.startswith("aten::"))
    sync = {e.key: e.count for e in ev if e.key in ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero")}
    top = sorted(((e.count, e.key) for e in ev if e.key.startswith("aten::")), reverse=True)[:8]
    print(argv, "micro-batch", cfg.micro_batch, "aten ops (incl. nested)", total, "sync-ish", sync)
    print("  most frequent:", top)

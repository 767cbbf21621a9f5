"""The model's and the trainer's formulas, each against an independent computation on a small
input: python -m pytest tests/test_golden_math.py -q

A loss that falls is not a right loss (a wrong one falls too), so each formula is pinned by value:
the RoPE table, the norms, the answer cross-entropy and its next-token alignment, the flow
interpolation and target, the condition-dropout rates and the logit-normal t (measured over many
draws at rates set in the config), guidance, the timestep shift and Euler, the EMA step, the
learning-rate schedule, the sample positions and split of every data path, what a checkpoint
holds against what the trainer held in memory, and the speed accounting."""
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import kernels
import model as M
import synth
import train
from model import EOS, PAD, UMM, UMMConfig, collate

TOK = synth.get_tokenizer("tiny")
W = synth.get_world("tiny")


def narrow(**overrides):
    torch.manual_seed(0)
    cfg = UMMConfig.preset("tiny", vocab_size=TOK.get_vocab_size(), width=64, depth=0, heads=0,
                           **overrides)
    return UMM(cfg)


def samples(task, n):
    return [synth.make_sample(W, task, "train", i) for i in range(n)]


# ----------------------------------------------------------------------------- the blocks' math

def test_rope_table_holds_the_angle_of_every_position_and_frequency():
    model = narrow()
    D = model.cfg.width // model.cfg.heads
    L = model.layouts["t2i"]  # BOS, caption, BOI (text), then the 4 x 4 noisy image, EOI, decoding
    T = model.cos_t2i.shape[0]
    freq = model.cfg.rope_base ** (-np.arange(D // 2) * 2.0 / D)  # pair i: 1 / base^(2i / D)
    # text: angle(p, i) = p * freq_i; image cell (r, c) at start s: pair i turns with s + r for
    # even i and with s + c for odd i
    row, col = np.arange(T), np.arange(T)
    s = L.noisy.start
    for cell in range(16):
        row[s + cell], col[s + cell] = s + cell // 4, s + cell % 4
    angles = np.where(np.arange(D // 2) % 2 == 0, row[:, None], col[:, None]) * freq[None]
    np.testing.assert_allclose(model.cos_t2i.numpy(), np.cos(angles), atol=1e-4)  # fp32 angles
    np.testing.assert_allclose(model.sin_t2i.numpy(), np.sin(angles), atol=1e-4)
    assert model.cos_t2i[1, 0].item() == pytest.approx(math.cos(1.0))
    assert model.sin_t2i[3, D // 2 - 1].item() == pytest.approx(math.sin(3 * 10000 ** (-(D - 2) / D)))
    assert model.cos_t2i[s + 6, 0].item() == pytest.approx(math.cos(s + 1))  # cell (1, 2): row 1
    assert model.cos_t2i[s + 6, 1].item() == pytest.approx(math.cos((s + 2) * freq[1]))  # col 2
    # without rope_2d every position turns by its place in the sequence
    flat = narrow(rope_2d=False)
    angles = np.arange(T)[:, None] * freq[None]
    np.testing.assert_allclose(flat.cos_t2i.numpy(), np.cos(angles), atol=1e-4)


def test_rope_rotates_each_pair_and_scores_depend_on_the_offset_only():
    model = narrow()
    D = model.cfg.width // model.cfg.heads
    cos, sin = model.cos_t2i, model.sin_t2i  # its first 40 positions are text
    # a unit vector in the first half turns towards its partner D/2 further on
    x = torch.zeros(1, 1, 8, D)
    x[..., 0] = 1.0
    y = M.rope(x, cos[:8], sin[:8])
    torch.testing.assert_close(y[0, 0, :, 0], torch.cos(torch.arange(8.0)))
    torch.testing.assert_close(y[0, 0, :, D // 2], torch.sin(torch.arange(8.0)))
    # q at position p against k at p + d: the same score for every p
    torch.manual_seed(0)
    q, k = torch.randn(D), torch.randn(D)
    T = 40
    qs = M.rope(q.expand(1, 1, T, D), cos[:T], sin[:T])[0, 0]
    ks = M.rope(k.expand(1, 1, T, D), cos[:T], sin[:T])[0, 0]
    for d in (1, 5):
        scores = (qs[:T - d] * ks[d:]).sum(-1)
        torch.testing.assert_close(scores, scores[:1].expand_as(scores), atol=1e-4, rtol=1e-4)
    assert not torch.allclose((qs[0] * ks[1]).sum(), (qs[0] * ks[5]).sum())


def test_image_tokens_score_each_other_by_their_row_and_column_offsets():
    # an edit's noisy cell (r, c) against its source's cell (r + dr, c + dc): one score per offset
    # wherever the cell is, and "one row down" differs from "four places on" (reading order)
    model = narrow()
    D = model.cfg.width // model.cfg.heads
    L = model.layouts["edit"]
    torch.manual_seed(0)
    q, k = torch.randn(D), torch.randn(D)
    qs = M.rope(q.expand(1, 1, L.T, D), model.cos_edit[:L.T], model.sin_edit[:L.T])[0, 0]
    ks = M.rope(k.expand(1, 1, L.T, D), model.cos_edit[:L.T], model.sin_edit[:L.T])[0, 0]

    def score(r, c, dr, dc):
        return (qs[L.noisy.start + 4 * r + c] * ks[L.clean.start + 4 * (r + dr) + c + dc]).sum()

    for dr, dc in ((0, 0), (1, 0), (0, 1), (1, -1)):
        cells = [(r, c) for r in range(4) for c in range(4) if 0 <= r + dr < 4 and 0 <= c + dc < 4]
        scores = torch.stack([score(r, c, dr, dc) for r, c in cells])
        torch.testing.assert_close(scores, scores[:1].expand_as(scores), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(0, 0, 1, 0), score(0, 0, 0, 1), atol=1e-3)
    # cell (0, 3) -> (1, 0) is 1 place on in reading order but (1, -3) in the grid
    assert not torch.allclose(score(0, 3, 1, -3), score(0, 0, 0, 1), atol=1e-3)


def test_norms_and_swiglu_by_hand():
    x = torch.tensor([[3.0, 4.0]])
    rms = math.sqrt((9 + 16) / 2)
    torch.testing.assert_close(M.rmsnorm(x, torch.tensor([1.0, 2.0])),
                               torch.tensor([[3 / rms, 8 / rms]]))
    got = M.rmsnorm_modulate(x[None], torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(got, torch.tensor([[[2 * 3 / rms, 4 / rms + 1]]]))
    silu = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(M.swiglu(torch.tensor([1.0]), torch.tensor([2.0])),
                               torch.tensor([2 * silu]))


# ----------------------------------------------------------------------------- the losses

class PositionTrunk:
    """Stands in for the trunk: the output at position p is p in every channel, so the logits a
    loss reads name the position they came from."""

    def __call__(self, x, mask, *args, **kwargs):
        B, T, C = x.shape
        return torch.arange(T, dtype=torch.float).view(1, T, 1).expand(B, T, C)


def test_answer_loss_is_the_cross_entropy_of_each_answer_token_given_the_ones_before():
    model = narrow()
    sub = collate(samples("vqa", 1), model.cfg, TOK)["vqa"]
    L = model.layouts["vqa"]
    a, b = TOK.token_to_id("[UNK]") + 7, TOK.token_to_id("[UNK]") + 11
    sub["tokens"][0, L.answer] = torch.tensor([a, b, EOS, PAD])  # a 3-token answer, then a pad
    torch.manual_seed(1)
    table = torch.randn(L.T, TOK.get_vocab_size())  # the logits each position's output gives
    model.trunk = PositionTrunk()
    model.text_logits = lambda h: table[h[..., 0].long()]
    # token j of the answer sits at position start + j; the output one position before predicts it
    start = L.answer.start
    nll = [torch.logsumexp(table[p - 1], 0).item() - table[p - 1, tok].item()
           for p, tok in ((start, a), (start + 1, b), (start + 2, EOS))]
    assert model.answer_loss(sub)[0].item() == pytest.approx(sum(nll) / 3, rel=1e-5)


def own_patches(img, p):  # (B, 3, S, S) -> (B, N, 3 p p): cells in reading order, channels first
    B, _, S, _ = img.shape
    return torch.stack([img[:, :, r:r + p, c:c + p].reshape(B, -1)
                        for r in range(0, S, p) for c in range(0, S, p)], 1)


def with_trunk(model, task, v):
    """A stand-in velocity_patches' return: the velocity, and zero trunk inputs and outputs."""
    z = torch.zeros(v.shape[0], model.layouts[task].T, model.cfg.width)
    return v, z, z


def test_flow_loss_interpolates_towards_noise_and_regresses_noise_minus_data():
    model = narrow(txt_dropout=0.0, src_dropout=0.0, src_pixel_dropout=0.0)
    batch = collate(samples("t2i", 2), model.cfg, TOK)
    seen = {}

    def velocity(task, sub, x_t, t, *keep):  # the "prediction": x_t itself, recorded
        seen["x_t"], seen["t"] = x_t, t
        return with_trunk(model, task, x_t)

    model.velocity_patches = velocity
    torch.manual_seed(0)
    x0 = own_patches(batch["t2i"]["target"], model.cfg.patch)
    t = torch.tensor([0.25, 0.8])
    eps = torch.randn_like(x0)
    _, parts = model.loss(batch, {"t2i": (t, eps, torch.rand(3, 2))})
    x_t = torch.stack([0.75 * x0[0] + 0.25 * eps[0], 0.2 * x0[1] + 0.8 * eps[1]])  # t = 1 is noise
    torch.testing.assert_close(seen["x_t"], x_t)
    torch.testing.assert_close(seen["t"], t)
    want = ((x_t - (eps - x0)) ** 2).mean((1, 2)).mean()  # target v = eps - x0, MSE per sample
    assert parts["flow"].item() == pytest.approx(want.item(), rel=1e-5)


def test_an_edit_weighs_the_patches_and_cells_it_changes_by_change_weight():
    model = narrow(txt_dropout=0.0, src_dropout=0.0, src_pixel_dropout=0.0, change_weight=4.0)
    batch = collate(samples("edit", 4), model.cfg, TOK)
    sub = batch["edit"]
    p = model.cfg.patch
    x0, source = own_patches(sub["target"], p), own_patches(sub["source"], p)
    changed = (x0 != source).any(-1).float()  # (B, N): the patches the edit redraws
    assert changed.sum(1).min() >= 1  # every one of these four edits changes something
    t, eps = torch.full((4,), 0.5), torch.randn_like(x0)

    def velocity(task, sub, x_t, t, *keep):  # off by 1 at every changed patch, exact elsewhere
        return with_trunk(model, task, eps - x0 + changed[..., None])

    model.velocity_patches = velocity
    _, parts = model.loss(batch, {"edit": (t, eps, torch.rand(3, 4))})
    k, N = changed.sum(1), changed.shape[1]
    want = (4 * k / (4 * k + (N - k))).mean()  # a changed patch's error counts 4 times
    assert parts["flow"].item() == pytest.approx(want.item(), rel=1e-5)
    assert want > (k / N).mean()  # what the plain per-patch mean would give

    # gen_cells: the cells whose label differs between source and target weigh 4, the rest 1
    seen = []
    model.cell_loss = lambda head, features, labels, weight: seen.append(weight) or labels.sum() * 0.0
    model.loss(batch, {"edit": (t, eps, torch.rand(3, 4))})
    gen_weight = seen[-1]
    differs = (sub["target_cells"] != sub["source_cells"]).any(-1)
    torch.testing.assert_close(gen_weight, torch.where(differs, 4.0, 1.0))
    torch.testing.assert_close(seen[0], torch.ones_like(seen[0]))  # sem_cells: all alike


def many_edits(model, B):
    """One edit sample repeated B times (views, no copies), collated for the model."""
    sub = collate(samples("uniedit", 1), model.cfg, TOK)["edit"]
    return {"edit": {k: v.expand(B, *v.shape[1:]) for k, v in sub.items()}}


def kept_conditions(model, batch, noise=None):
    """The (text, semantic source, pixel source) kept-flags the flow loss trains each row with."""
    seen = {}

    def velocity(task, sub, x_t, t, *keep):
        seen["keep"] = [k.float() for k in keep]
        seen["t"] = t
        return with_trunk(model, task, torch.zeros_like(x_t))

    model.velocity_patches = velocity
    model.loss(batch, noise)
    return seen


def test_each_condition_is_dropped_at_its_configured_rate_independently():
    model = narrow(txt_dropout=0.3, src_dropout=0.2, src_pixel_dropout=0.5, t_mean=0.0).train()
    B = 4000
    batch = many_edits(model, B)
    torch.manual_seed(0)
    seen = kept_conditions(model, batch)
    txt, sem, pix = seen["keep"]
    assert txt.mean().item() == pytest.approx(0.7, abs=0.03)
    assert sem.mean().item() == pytest.approx(0.8, abs=0.03)
    assert pix.mean().item() == pytest.approx(0.5, abs=0.03)
    assert ((1 - txt) * (1 - sem)).mean().item() == pytest.approx(0.3 * 0.2, abs=0.015)
    # training times are logit-normal: t = sigmoid(u), u ~ N(0, 1)
    t = seen["t"]
    assert (t < 1 / (1 + math.e)).float().mean().item() == pytest.approx(0.1587, abs=0.02)
    assert t.median().item() == pytest.approx(0.5, abs=0.03)
    # in eval mode every condition is kept, but a source that training always drops stays dropped
    model.eval()
    assert all(k.all() for k in kept_conditions(model, many_edits(model, 8))["keep"])
    model.cfg.src_pixel_dropout = 1.0
    for mode in (model.train, model.eval):
        mode()
        assert not kept_conditions(model, many_edits(model, 8))["keep"][2].any()


def test_sampling_uses_the_pixel_source_only_where_training_kept_it():
    model = narrow().eval()
    sub = many_edits(model, 2)["edit"]
    x = torch.zeros(2, 3, W.size, W.size)
    for rate, pixels in ((0.1, True), (1.0, False)):
        model.cfg.src_pixel_dropout = rate
        seen = {}
        model.velocity_patches = lambda task, s, x_t, t, *keep: (seen.update(keep=keep)
                                                                 or with_trunk(model, task, x_t))
        model.velocity("edit", sub, x, 0.5)
        assert [k.tolist() for k in seen["keep"]] == [[True] * 2, [True] * 2, [pixels] * 2]
        model.velocity("edit", sub, x, 0.5, with_image=False)
        assert [k.tolist() for k in seen["keep"]] == [[True] * 2, [False] * 2, [False] * 2]


def test_an_edit_predicts_the_change_to_its_pixel_source_where_that_source_is_kept():
    # The flow head's output layer starts at zero, so a fresh model's x_0 is the kept pixel source
    # exactly (src_residual), and zero without it or where the pixel source is dropped.
    sub = many_edits(narrow(), 2)["edit"]
    source = own_patches(sub["source"], 16)
    x_t, t = torch.randn_like(source), torch.tensor([0.5, 0.8])
    for residual in (True, False):
        model = narrow(src_residual=residual)
        for pixels in (True, False):
            keep = [torch.ones(2, dtype=torch.bool)] * 2 + [torch.full((2,), pixels)]
            v = model.velocity_patches("edit", sub, x_t, t, *keep)[0]
            x0 = source if residual and pixels else torch.zeros_like(source)
            torch.testing.assert_close(v, (x_t - x0) / t[:, None, None])


def test_a_checkpoint_from_before_a_model_key_loads_with_the_value_it_was_trained_with(tmp_path):
    model = narrow()
    run = str(tmp_path / "run")
    meta = {"model": {k: v for k, v in dataclasses.asdict(model.cfg).items() if k not in M.LEGACY}}
    train.save_checkpoint(run, 1, model, model.state_dict(), torch.optim.AdamW(model.parameters()),
                          meta, TOK, keep=0)
    loaded = M.load_checkpoint(run)[0]
    assert {k: getattr(loaded.cfg, k) for k in M.LEGACY} == M.LEGACY
    assert M.LEGACY != {k: getattr(model.cfg, k) for k in M.LEGACY}  # today's defaults differ


# ----------------------------------------------------------------------------- sampling

def test_guidance_combines_the_velocities_as_the_formulas_say():
    model = narrow()
    values = {(False, False): 1.0, (True, False): 1000.0, (False, True): 10.0, (True, True): 100.0}
    model.velocity = lambda task, sub, x_t, t, with_text=True, with_image=True: \
        torch.full_like(x_t, values[with_text, with_image])
    x = torch.zeros(1, 3, 4, 4)
    # t2i: v_u + w (v_c - v_u)
    assert model.guided_velocity("t2i", None, x, 0.5, txt_scale=4.0)[0, 0, 0, 0] == 1 + 4 * 999
    # edit: v(0,0) + s_img [v(img,0) - v(0,0)] + s_txt [v(img,txt) - v(img,0)]
    got = model.guided_velocity("edit", None, x, 0.5, txt_scale=2.0, img_scale=3.0)
    assert got[0, 0, 0, 0] == 1 + 3 * (10 - 1) + 2 * (100 - 10)


def test_timestep_shift_and_euler_steps_by_hand():
    assert M.shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    assert M.shift_time(torch.tensor(0.25), 3.0).item() == pytest.approx(0.75 / 1.5)
    assert M.shift_time(torch.tensor(1.0), 3.0).item() == pytest.approx(1.0)
    assert M.shift_time(torch.tensor(0.3), 1.0).item() == pytest.approx(0.3)
    calls = []

    def velocity(x, t):
        calls.append(t)
        return torch.full_like(x, t)  # v depends on t, so each step's size shows

    x = M.euler(velocity, torch.zeros(1), steps=2, shift=3.0)
    assert calls == pytest.approx([1.0, 0.75])  # times 1, 0.5 shifted to 1, 0.75; ends at 0
    assert x.item() == pytest.approx((0.75 - 1.0) * 1.0 + (0.0 - 0.75) * 0.75)


# ----------------------------------------------------------------------------- the trainer

def test_one_ema_step_moves_a_tenth_of_the_way_at_decay_0_9():
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 3.0]]))
    ema = {"weight": torch.tensor([[0.0, 1.0]])}
    train.update_ema(ema, net, 0.9)
    torch.testing.assert_close(ema["weight"], torch.tensor([[0.1, 1.2]]))


def test_learning_rate_warms_up_then_follows_the_cosine_to_min_lr():
    cfg = train.TrainConfig(lr=1e-3, min_lr=1e-4, warmup=10, max_steps=110)
    want = {0: 1e-4, 4: 5e-4, 9: 1e-3, 10: 1e-3, 60: 5.5e-4, 110: 1e-4,
            35: 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 4))}
    for step, lr in want.items():
        assert train.lr_at(cfg, step) == pytest.approx(lr), step


def test_recipe_stages_split_the_steps_by_their_fractions():
    cfg = train.TrainConfig(recipe="staged", max_steps=10)
    assert [train.stage_at(cfg, s)[0] for s in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_task_counts_round_by_largest_remainder():
    # 4 samples at 5:3:2 are 2, 1.2 and 0.8: the spare sample goes to the largest remainder
    assert train.task_counts("vqa:5,t2i:3,edit:2", 4) == {"vqa": 2, "t2i": 1, "edit": 1}
    assert train.task_counts("vqa:2,t2i:1,edit:1", 8) == {"vqa": 4, "t2i": 2, "edit": 2}
    assert train.task_counts("vqa:1,t2i:1,edit:1", 4) == {"vqa": 2, "t2i": 1, "edit": 1}
    for n in range(1, 20):
        assert sum(train.task_counts("vqa:3,t2i:2,edit:2,uniedit:1", n).values()) == n


def streamed(monkeypatch, cfg, mix, chunks):
    """The samples the stream puts in micro-batches `chunks`, before collation."""
    monkeypatch.setattr(train, "collate", lambda samples, mcfg, tok: samples)
    stream = train.Stream(cfg, mix, TOK, None)
    return [stream[c] for c in chunks]


def test_the_stream_trains_on_fresh_train_samples_at_every_position(monkeypatch):
    cfg = train.TrainConfig(micro_batch=4, seed=3)
    batches = streamed(monkeypatch, cfg, "vqa:1,edit:1", range(3))
    for c, batch in enumerate(batches):
        assert all(s["split"] == "train" for s in batch)
        for task in ("vqa", "edit"):  # micro-batch c holds positions 4c .. 4c + 1 of each task
            assert [s["index"] for s in batch if s["task"] == task] == [4 * c, 4 * c + 1]
        want = synth.make_sample(W, "vqa", "train", 4 * c, seed=3)
        assert batch[0]["text"] == want["text"] and batch[0]["answer"] == want["answer"]


def test_a_family_stream_raises_that_familys_share_with_samples_of_its_task(monkeypatch, tmp_path):
    cfg = train.TrainConfig(micro_batch=4, seed=3)
    plain, mixed = (streamed(monkeypatch, cfg, mix, range(2)) for mix in ("t2i:1", "t2i:1,scene:1"))
    for c, batch in enumerate(mixed):
        assert all(s["task"] == "t2i" for s in batch)  # collated, trained and judged as T2I
        t2i = [s for s in batch if not s["id"].startswith("scene/")]
        scenes = [s for s in batch if s["id"].startswith("scene/")]
        assert [s["family"] for s in scenes] == ["scene", "scene"]
        assert scenes[0]["text"] == synth.make_sample(W, "scene", "train", 4 * c, seed=3)["text"]
        # the t2i stream draws what it drew without the scene stream: its seeds are its own
        assert [s["text"] for s in t2i] == [s["text"] for s in plain[c][:2]]
    assert {synth.make_sample(W, "t2i", "train", i)["family"] for i in range(40)} == set(synth.T2I_FAMILIES)
    with pytest.raises(ValueError, match="scene"):
        train.parse_mix("vqa:1,scenes:1")
    # from a dataset folder the stream draws the train records of its family
    folder = synth.write_dataset(str(tmp_path / "ds"), 80, "tiny", tasks=("t2i",), workers=1)
    ds = synth.Dataset(folder)
    want = {ds[i]["id"] for i in range(len(ds)) if ds[i]["split"] == "train" and ds[i]["family"] == "scene"}
    cfg = train.TrainConfig(micro_batch=1, data=folder)
    drawn = {s["id"] for batch in streamed(monkeypatch, cfg, "scene:1", range(len(want))) for s in batch}
    assert drawn == want and want


def hand_made_dataset(folder, splits):
    """A synth.py dataset folder of VQA samples, one per entry of `splits`, in that split."""
    os.makedirs(folder)
    made = [synth.make_sample(W, "vqa", split, i) for i, split in enumerate(splits)]
    np.save(os.path.join(folder, "images.npy"), np.stack([s["image"] for s in made]))
    with open(os.path.join(folder, "samples.jsonl"), "w") as f:
        for row, s in enumerate(made):
            rec = {k: v for k, v in s.items() if k not in ("image", "target")}
            f.write(json.dumps({**rec, "image_idx": row, "target_idx": None}) + "\n")
    meta = {"version": synth.VERSION, "world": dataclasses.asdict(W), "seed": 0,
            "tasks": ["vqa"], "n": len(made), "n_images": len(made)}
    json.dump(meta, open(os.path.join(folder, "meta.json"), "w"))
    TOK.save(os.path.join(folder, "tokenizer.json"))
    return [s["id"] for s in made if s["split"] == "train"]


def test_a_data_folder_run_reads_every_train_record_and_nothing_else(monkeypatch, tmp_path):
    folder = str(tmp_path / "ds")
    train_ids = hand_made_dataset(folder, ["train", "val", "train", "test", "test_ood", "train",
                                           "train", "val", "train", "train", "test", "train"])
    cfg = train.TrainConfig(micro_batch=2, data=folder)
    batches = streamed(monkeypatch, cfg, "vqa:1", range(len(train_ids)))
    drawn = [s["id"] for batch in batches for s in batch]
    assert all(s["split"] == "train" for batch in batches for s in batch)
    # two epochs in a shuffled order: every train record twice, nothing else
    assert sorted(drawn) == sorted(train_ids * 2)
    assert drawn[:len(train_ids)] != sorted(drawn[:len(train_ids)])


def test_a_checkpoint_holds_what_the_trainer_held_in_memory(monkeypatch, tmp_path):
    decay = 0.5  # far from 1, so the EMA of two steps differs from every single weight
    held, weights = {}, []
    real_init = train.init_run

    def init_run(*args):
        model, ema, opt, start = real_init(*args)
        held.update(ema=ema, opt=opt)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        return model, ema, opt, start

    monkeypatch.setattr(train, "init_run", init_run)
    cfg = train.parse_args(["--device=cpu", "--width=64", "--batch_size=4", "--micro_batch=4",
                            "--max_steps=2", "--save_every=2", "--eval_every=0", "--warmup=1",
                            "--peak_tflops=1",
                            f"--ema={decay}", f"--out_dir={tmp_path}"])
    run_dir = train.train(cfg, after_step=lambda step, model, stream: weights.append(
        {k: v.clone() for k, v in model.state_dict().items()}))
    ckpt = os.path.join(run_dir, "step_000002")
    w0, w1, w2 = weights
    saved = load_file(os.path.join(ckpt, "model.safetensors"))
    ema = load_file(os.path.join(ckpt, "ema.safetensors"))
    for k in w2:
        assert torch.equal(saved[k], w2[k]), k
        assert torch.equal(ema[k], held["ema"][k]), k
        # the EMA of two steps from the initial weights, by hand
        want = decay ** 2 * w0[k] + decay * (1 - decay) * w1[k] + (1 - decay) * w2[k]
        torch.testing.assert_close(ema[k], want.float(), rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(w1[k], w2[k]) for k in w2)  # the weights did move
    opt = torch.load(os.path.join(ckpt, "optim.pt"))
    live = held["opt"].state_dict()
    assert opt["param_groups"] == live["param_groups"]
    for i, state in live["state"].items():
        assert torch.equal(opt["state"][i]["step"], state["step"])
        assert state["step"].item() == 2
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt["state"][i][key], state[key])
    meta = json.load(open(os.path.join(ckpt, "config.json")))
    assert meta["step"] == 2 and meta["train"]["ema"] == decay and meta["train"]["seed"] == 0


# ----------------------------------------------------------------------------- speed accounting

class Accounted:
    """A model of known size: tokens and FLOPs per sample by task."""
    tokens = {"vqa": 10, "t2i": 20, "edit": 30}
    flops = {"vqa": 100, "t2i": 200, "edit": 300}

    def tokens_per_sample(self, task):
        return self.tokens[task]

    def flops_per_sample(self, task):
        return self.flops[task]


def test_speed_rates_by_hand():
    # micro-batch of 4 (2 vqa, 1 t2i, 1 edit), 8 samples a step, 2 s a step, peak 1000 FLOP/s
    r = kernels.rates(Accounted(), {"vqa": 2, "t2i": 1, "edit": 1}, 8, 2.0, 1000.0)
    assert r["ms_per_step"] == pytest.approx(2000)
    assert r["tokens_per_s"] == pytest.approx((2 * 10 + 20 + 30) / 4 * 8 / 2)
    assert r["images_per_s"] == pytest.approx(2 / 4 * 8 / 2)  # generated images only
    assert r["mfu"] == pytest.approx((2 * 100 + 200 + 300) / 4 * 8 / 2 / 1000)


def test_timings_leave_out_the_warm_up_call(monkeypatch):
    clock = [0.0]  # a clock that only the timed calls move: the first by 100 s, the others by 1 s
    monkeypatch.setattr(kernels.time, "perf_counter", lambda: clock[0])

    def call():
        clock[0] += 1.0 if clock[0] else 100.0

    assert kernels.timings(call, torch.device("cpu"), repeats=3) == [1.0, 1.0, 1.0]
    assert kernels.median_seconds(call, torch.device("cpu"), repeats=3) == 1.0

"""Tests of model.py on the tiny world: python -m pytest tests/test_model.py -q (about a minute on 2 CPU cores)."""
import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

import model as M
import synth
from model import PAD, UMM, UMMConfig, collate, euler, timestep_features

TOK = synth.get_tokenizer("tiny")


def tiny(**overrides):
    return UMM(UMMConfig.preset("tiny", vocab_size=TOK.get_vocab_size(), **overrides))


def samples(task, n, start=0):
    return [synth.make_sample("tiny", task, "train", start + i) for i in range(n)]


def randomize_flow_head(model):  # the zero-initialised output would make every velocity 0
    torch.manual_seed(1)
    for blk in model.head:
        torch.nn.init.normal_(blk.ada.weight, std=0.02)
    torch.nn.init.normal_(model.to_pixels.weight, std=0.02)


def logits_with_bump(model, task, sub, pos=None, keep_sem=True):
    """LM logits at every position of the trunk, after adding 1 to the input vector at position pos."""
    B = sub["tokens"].shape[0]
    ones = torch.ones(B, dtype=torch.bool)
    torch.manual_seed(2)
    x_t = torch.randn(B, model.n, 3 * model.cfg.patch ** 2)
    temb = model.t_mlp(timestep_features(torch.full((B,), 0.5), model.cfg.width))
    keep = torch.full((B,), keep_sem)
    x, vis = model.embed(task, sub["tokens"], sub.get("sem"), sub.get("source"), x_t, temb, keep, ones)
    if pos is not None:
        x[:, pos] += 1.0
    h = model.trunk(x, task, model.mask(task, vis), gen=model.layouts[task].noisy)
    return model.lm_head(model.norm(h))  # (B, T, V)


def changed(a, b):  # (T,) bool: positions whose logits moved in any sample
    return (a - b).abs().amax(dim=(0, 2)) > 1e-5


@torch.no_grad()
def test_mask_rule():
    torch.manual_seed(0)
    model = tiny().eval()
    edit = collate(samples("uniedit", 2), model.cfg, TOK)["edit"]
    vqa = collate(samples("vqa", 2), model.cfg, TOK)["vqa"]
    E, V = model.layouts["edit"], model.layouts["vqa"]
    base = logits_with_bump(model, "edit", edit)
    # a noisy token changes its own image (all of it: bidirectional) and nothing else, not even EOI after it
    moved = changed(base, logits_with_bump(model, "edit", edit, E.noisy.start + 5))
    expect = torch.zeros(E.T, dtype=torch.bool)
    expect[E.noisy] = True
    assert torch.equal(moved, expect)
    # the last token of the clean source and of the semantic source reach their image's first token
    for seg in (E.clean, E.sem):
        moved = changed(base, logits_with_bump(model, "edit", edit, seg.stop - 1))
        assert moved[seg].all() and not moved[:seg.start].any()
    # a text token changes itself and every later position, never an earlier one
    k = V.text.stop - 3
    moved = changed(logits_with_bump(model, "vqa", vqa), logits_with_bump(model, "vqa", vqa, k))
    assert not moved[:k].any() and moved[k:].all()
    # a dropped semantic source is invisible to the text after it
    off = logits_with_bump(model, "edit", edit, keep_sem=False)
    assert not changed(off, logits_with_bump(model, "edit", edit, E.sem.start + 3, keep_sem=False))[E.text].any()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_flex_attention_matches_dense_masks(device, monkeypatch):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("compiled FlexAttention needs CUDA")
    torch.manual_seed(0)
    model = tiny().to(device).eval()
    randomize_flow_head(model)
    if device == "cpu":  # eager FlexAttention runs forward-only on CPU, which still checks the block mask
        monkeypatch.setattr(M, "compiled_flex_attention", lambda: flex_attention)
        monkeypatch.setattr(model, "mask", lambda task, vis: M.attention_mask(model.layouts[task].kind, vis, model.cfg.flex))
    batch = collate(samples("vqa", 2) + samples("t2i", 1) + samples("uniedit", 2), model.cfg, TOK)
    batch = {g: {k: v.to(device) for k, v in sub.items()} for g, sub in batch.items()}
    out = {}
    for flex in (True, False):
        model.cfg.flex = flex
        torch.manual_seed(0)
        with torch.set_grad_enabled(device == "cuda"):  # FlexAttention has no CPU backward
            total, parts = model.loss(batch)
            x_t = torch.randn_like(batch["edit"]["target"])
            v = model.velocity("edit", batch["edit"], x_t, 0.7, with_text=False)
        grad = torch.autograd.grad(total, model.blocks[0].und.qkv.weight)[0] if device == "cuda" else None
        out[flex] = (parts["ce"], parts["flow"], v, grad)
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_overfit_one_batch_of_each_task():
    torch.manual_seed(0)
    model = tiny(txt_dropout=0.0, src_dropout=0.0, src_pixel_dropout=0.0)
    batch = collate(samples("vqa", 2) + samples("t2i", 2) + samples("uniedit", 2), model.cfg, TOK)
    assert set(batch) == {"vqa", "t2i", "edit"}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)  # 5e-3 oscillates with x-prediction
    for step in range(150):
        torch.manual_seed(0)  # the same t and noise every step, so the flow loss can reach zero too
        total, parts = model.loss(batch)
        if step == 0:
            first = parts
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as train.py does; unclipped Adam spikes now and then
        opt.step()
    assert first["ce"] > 3 and first["flow"] > 1
    assert parts["ce"] < 0.01, parts
    assert parts["flow"] < 0.05, parts


@torch.no_grad()
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_equals_uncached(temperature):
    torch.manual_seed(0)
    model = tiny().eval()
    sub = collate(samples("vqa", 8), model.cfg, TOK)["vqa"]
    runs = [model.generate_text(sub, 6, temperature, use_cache, torch.Generator().manual_seed(3))
            for use_cache in (True, False)]
    assert runs[0].shape == (8, 6)
    assert torch.equal(runs[0], runs[1])
    # real decoding: sampled tokens vary; a random model's greedy tokens mostly repeat, but not everywhere
    assert len(set(runs[0].flatten().tolist())) > (3 if temperature else 1)


def test_euler_recovers_the_target_of_an_exact_field():
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 8, 8)
    velocity = lambda x, t: (x - x0) / t  # = eps - x0 on the straight path through x
    for shift in (1.0, 3.0):
        torch.testing.assert_close(euler(velocity, torch.randn(2, 3, 8, 8), steps=7, shift=shift), x0)


@torch.no_grad()
def test_guidance_at_scale_one_is_the_conditional_velocity():
    torch.manual_seed(0)
    model = tiny().eval()
    randomize_flow_head(model)
    batch = collate(samples("t2i", 2) + samples("edit", 2), model.cfg, TOK)
    for task in ("t2i", "edit"):
        S = model.cfg.image_size
        x_t = torch.randn(2, 3, S, S)
        full = model.velocity(task, batch[task], x_t, 0.6)
        assert (full - model.velocity(task, batch[task], x_t, 0.6, False, False)).abs().max() > 1e-4
        torch.testing.assert_close(model.guided_velocity(task, batch[task], x_t, 0.6, 1.0, 1.0), full)
    assert (model.velocity("edit", batch["edit"], x_t, 0.6, with_image=False) - full).abs().max() > 1e-4
    images = model.sample("edit", batch["edit"], steps=2, shift=3.0, txt_scale=4.0, img_scale=1.5)
    assert images.shape == (2, 3, S, S) and images.abs().max() <= 1


def train_losses(model, steps=40):
    batch = collate(samples("t2i", 2) + samples("uniedit", 2), model.cfg, TOK)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        torch.manual_seed(0)
        total, _ = model.loss(batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    return losses


def test_mot_and_refiner_train_and_add_their_weights():
    torch.manual_seed(0)
    plain = tiny().num_params()["total"]
    mot, refined = tiny(mot=True), tiny(refiner_layers=2)
    expert = sum(p.numel() for p in mot.blocks[0].und.parameters())
    assert mot.num_params()["total"] - plain == mot.cfg.depth * expert
    block = sum(p.numel() for p in refined.refiner[0].parameters())
    assert refined.num_params()["total"] - plain == 2 * block + refined.cfg.width  # blocks + CLS
    assert mot.flops_per_sample("edit") == tiny().flops_per_sample("edit")  # one expert per token
    for model, used in ((mot, mot.blocks[0].gen.qkv.weight), (refined, refined.cls)):
        losses = train_losses(model)
        assert losses[-1] < 0.55 * losses[0], losses
        assert used.grad is not None and used.grad.abs().sum() > 0


def test_collate_layout_and_accounting():
    cfg = tiny().cfg
    mixed = samples("vqa", 2) + samples("t2i", 1) + samples("edit", 1) + samples("uniedit", 1)
    batch = collate(mixed, cfg, TOK)
    model = tiny()
    V, E = model.layouts["vqa"], model.layouts["edit"]
    assert batch["vqa"]["tokens"].shape == (2, V.T) and batch["edit"]["tokens"].shape == (2, E.T)
    assert batch["edit"]["rows"].tolist() == [3, 4]
    vqa = batch["vqa"]["tokens"][0]
    question = TOK.encode(mixed[0]["text"]).ids
    assert vqa[V.text].tolist() == [PAD] * (cfg.vqa_text - len(question) - 1) + question + [5]  # left-padded, SEP
    assert vqa[V.answer].tolist() == TOK.encode(mixed[0]["answer"]).ids + [2] + [PAD] * (cfg.answer_len - 2)
    S = cfg.image_size
    assert batch["edit"]["source"].shape == (2, 3, S, S) and batch["edit"]["source"].min() >= -1
    total, parts = model.loss(batch)
    assert {"ce", "flow"} <= set(parts) and torch.isfinite(total)
    n = model.num_params()
    assert 1e6 < n["total"] < 3e6 and n["matmul"] < n["total"]
    assert model.flops_per_sample("uniedit") > model.flops_per_sample("t2i") > 6 * n["matmul"] * 0.2


def test_every_text_of_every_world_and_split_fits_its_layout_slot():
    # a longer text would stop training with collate's error: the slots hold the longest
    # texts of 500 samples per task and split (6-object test_ood captions, nested edits)
    cfg = UMMConfig.preset("tiny")
    room = {"vqa": cfg.vqa_text - 1, "t2i": cfg.t2i_text, "edit": cfg.edit_text,
            "uniedit": cfg.edit_text}  # a question also needs its SEP
    for world in ("tiny", "default"):
        tok = synth.get_tokenizer(world)
        for task, n in room.items():
            longest = max(len(tok.encode(text).ids) for split in synth.SPLITS for i in range(500)
                          for s in [synth.make_sample(world, task, split, i)]
                          for text in (s["text"], s["probe"] and s["probe"]["question"]) if text)
            assert longest <= n, (world, task, longest)


def test_bad_inputs_get_one_line_errors():
    model = tiny()
    cfg = model.cfg
    bad = dict(samples("uniedit", 1)[0])
    S = cfg.image_size
    for image, limit in (((16, 16, 3), f"image_size={S}"), ((S, S, 4), f"({S}, {S}, 3)")):
        with pytest.raises(ValueError, match=limit.replace("(", r"\(").replace(")", r"\)")):
            collate([dict(bad, image=torch.zeros(image, dtype=torch.uint8).numpy())], cfg, TOK)
    sub = collate([bad], cfg, TOK)["edit"]
    for shape in ((1, 3, 16, 16), (1, 4, S, S)):
        with pytest.raises(ValueError, match=f"image_size={S}"):
            model.velocity("edit", sub, torch.zeros(shape), 0.5)
    with pytest.raises(ValueError, match="edit_text=36"):
        collate([dict(bad, text="paint the red circle blue. " * 20)], cfg, TOK)
    with pytest.raises(ValueError, match="heads=3"):
        UMMConfig(width=128, heads=3)
    with pytest.raises(ValueError, match="patch=5"):
        UMMConfig(image_size=32, patch=5)
    with pytest.raises(ValueError, match="pos_std=-1"):
        UMMConfig(pos_std=-1)
    with pytest.raises(ValueError, match="vocab_size"):
        UMM(UMMConfig.preset("tiny"))
    with pytest.raises(ValueError, match="preset"):
        UMMConfig.preset("huge")


def test_the_scripts_import_each_other_without_a_circle():
    # Module-level imports among the six scripts form no circle; the model and the kernels never
    # import train, not even in a function (kernels.py's benchmark reads model.py's presets as it runs).
    import ast
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scripts = ["synth", "model", "kernels", "train", "sample", "eval"]

    def imported(node):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        return {n for n in names if n in scripts}

    top, anywhere = {}, {}
    for name in scripts:
        tree = ast.parse(open(os.path.join(root, f"{name}.py")).read())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        anywhere[name] = set().union(*map(imported, imports))
        module_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        top[name] = set().union(*map(imported, module_level))
    assert "train" not in anywhere["model"] | anywhere["kernels"]
    order = []  # take scripts whose imports are all taken, until all are: possible iff no circle
    while len(order) < len(scripts):
        ready = [s for s in scripts if s not in order and top[s] <= set(order)]
        assert ready, f"import circle among {sorted(set(scripts) - set(order))}"
        order += ready


def test_cell_labels_name_each_patch_cells_shape_color_and_size():
    scene = [["square", "red", "small", 0, 1], ["cross", "white", "large", 3, 3]]
    # hand-written classes: 0 is empty, then the world's order of values
    square, cross = 1 + synth.World.shapes.index("square"), 1 + synth.World.shapes.index("cross")
    red, white = 1 + synth.World.colors.index("red"), 1 + synth.World.colors.index("white")
    small, large = 1 + synth.get_world("tiny").sizes.index("small"), 1 + synth.get_world("tiny").sizes.index("large")
    one_patch = M.cell_labels(scene, UMMConfig.preset("tiny", vocab_size=1))  # 4 x 4 patches, one per cell
    assert one_patch.shape == (16, 3)
    assert one_patch[1].tolist() == [square, red, small]  # row 0, column 1
    assert one_patch[15].tolist() == [cross, white, large]
    assert one_patch[[0, 2, 4, 14]].eq(0).all()  # empty cells are class 0 in all three attributes
    four_patches = M.cell_labels(scene, UMMConfig.preset("small", vocab_size=1))  # 8 x 8 patches, 2 x 2 per cell
    grid = four_patches.reshape(8, 8, 3)
    assert grid[0:2, 2:4].reshape(4, 3).tolist() == [[square, red, small]] * 4
    assert grid[6:8, 6:8].reshape(4, 3).tolist() == [[cross, white, large]] * 4
    assert int((four_patches[:, 0] > 0).sum()) == 8


def test_the_cell_losses_are_on_by_weight_and_reach_only_their_paths():
    torch.manual_seed(0)
    batch = collate(samples("vqa", 2) + samples("t2i", 2) + samples("edit", 2), UMMConfig.preset("tiny", vocab_size=TOK.get_vocab_size()), TOK)
    assert batch["vqa"]["sem_cells"].shape == (2, 16, 3) and batch["t2i"]["target_cells"].shape == (2, 16, 3)
    assert set(batch["edit"]) >= {"source_cells", "target_cells"} and "target_cells" not in batch["vqa"]
    model = tiny()
    noise = model.draw_noise(batch)
    total, parts = model.loss(batch, noise)
    assert {"sem_cells", "gen_cells"} <= set(parts)
    # each is a mean cross-entropy over 3 attributes: at initialisation near the mean log of the class counts
    chance = sum(torch.log(torch.tensor(float(k))) for k in M.CELL_CLASSES) / 3
    assert abs(parts["sem_cells"] - chance) < 0.3 and abs(parts["gen_cells"] - chance) < 0.3
    off = tiny(sem_cell_weight=0.0, gen_cell_weight=0.0)
    off.load_state_dict(model.state_dict())
    total_off, parts_off = off.loss(batch, noise)
    assert "sem_cells" not in parts_off and "gen_cells" not in parts_off
    torch.testing.assert_close(total, total_off + parts["sem_cells"] + parts["gen_cells"])
    # the generation head's loss trains the trunk, not the semantic encoder; the semantic one the encoder
    reached = lambda p: p.grad is not None and bool(p.grad.any())
    only_gen = tiny(sem_cell_weight=0.0, ce_weight=0.0, flow_weight=0.0)
    only_gen.loss(batch, noise)[0].backward()
    assert all(reached(p) for p in only_gen.blocks.parameters()) and reached(only_gen.pix_in.weight)
    assert not reached(only_gen.sem_cells.weight) and not reached(only_gen.lm_head.weight)
    only_sem = tiny(gen_cell_weight=0.0, ce_weight=0.0, flow_weight=0.0)
    only_sem.loss(batch, noise)[0].backward()
    assert reached(only_sem.enc_in.weight) and reached(only_sem.sem_pos)
    assert not any(reached(p) for p in list(only_sem.blocks.parameters()) + list(only_sem.gen_cells.parameters()))


# ----------------------------------------------------------------------------- dual_tokens (UniToken)

def images(split, n):  # n vqa samples of a split and their images (n, 3, S, S) in [-1, 1]
    found = [synth.make_sample("tiny", "vqa", split, i) for i in range(n)]
    return found, torch.stack([torch.as_tensor(s["image"]).permute(2, 0, 1).float() / 127.5 - 1 for s in found])


def test_codes_round_trip_every_training_patch_and_miss_only_the_held_out_objects():
    model = tiny(dual_tokens=True)
    assert model.fit_codebook(images("train", 1000)[1]) == 0.0
    # one code per distinct training patch: 5 shapes x 8 colours x 2 sizes, less the 5 held-out
    # (shape, colour) combos in 2 sizes, and the empty cell; the other codes lie outside [-1, 1]
    assert int((model.codebook.abs() <= 1).all(1).sum()) == 71
    _, val = images("val", 200)
    assert torch.equal(model.decode_codes(model.encode_codes(val)), val)
    # test_ood holds the combos no training image shows: exactly their cells come back as another object
    ood, x = images("test_ood", 100)
    heldout, missed = synth.get_world("tiny").heldout, 0
    for s, img, back in zip(ood, x, model.decode_codes(model.encode_codes(x))):
        for shape, color, size, r, c in s["scene"]:
            cell = (slice(None), slice(16 * r, 16 * r + 16), slice(16 * c, 16 * c + 16))
            assert torch.equal(back[cell], img[cell]) == ((shape, color) not in heldout)
            missed += (shape, color) in heldout
    assert missed > 20


def dual_model():
    torch.manual_seed(0)
    model = tiny(dual_tokens=True)
    model.fit_codebook(images("train", 300)[1])
    randomize_flow_head(model)
    return model


@torch.no_grad()
def test_dual_tokens_lay_an_image_out_as_unitoken_and_hide_its_codes_with_the_image():
    model = dual_model()
    V, E, n = model.layouts["vqa"], model.layouts["edit"], model.n
    assert (V.T, E.T) == (tiny().layouts["vqa"].T + n + 3, tiny().layouts["edit"].T + n + 3)
    batch = collate(samples("vqa", 2) + samples("edit", 2), model.cfg, TOK)
    for L, tokens in ((V, batch["vqa"]["tokens"][0]), (E, batch["edit"]["tokens"][0])):
        # BOS BOI [codes] SEP [semantic] EOI, then the text
        assert (L.code_boi, L.codes, L.code_sep, L.sem, L.code_eoi) == (
            slice(1, 2), slice(2, 2 + n), slice(2 + n, 3 + n), slice(3 + n, 3 + 2 * n), slice(3 + 2 * n, 4 + 2 * n))
        assert tokens[:2].tolist() == [M.BOS, M.BOI] and tokens[L.code_sep].item() == M.SEP
        assert tokens[L.code_eoi].item() == M.EOI and (L.kind[L.codes] == M.CODES).all()
    mask = M.attention_mask(V.kind, torch.ones(1, V.T, dtype=torch.bool), False)[0, 0]  # (T, T)
    assert mask[V.codes, V.codes].all() and not mask[V.codes, V.sem].any()  # bidirectional; sem comes later
    assert mask[V.sem, V.codes].all() and mask[V.text, V.codes].all()
    # the codes reach the answer; an edit's codes are dropped with its semantic source
    vqa, edit = batch["vqa"], batch["edit"]
    assert changed(logits_with_bump(model, "vqa", vqa), logits_with_bump(model, "vqa", vqa, V.codes.start))[V.answer].all()
    moved = changed(logits_with_bump(model, "edit", edit), logits_with_bump(model, "edit", edit, E.codes.start))
    assert moved[E.noisy].all()
    dropped = changed(logits_with_bump(model, "edit", edit, keep_sem=False),
                      logits_with_bump(model, "edit", edit, E.codes.start, keep_sem=False))
    assert dropped.nonzero().flatten().tolist() == [E.codes.start]  # no other position sees it
    # KV-cache decoding and sampling run on the longer layouts
    assert torch.equal(model.generate_text(vqa, 4), model.generate_text(vqa, 4, use_cache=False))
    assert model.sample("edit", edit, steps=2).shape == edit["source"].shape
    assert model.flops_per_sample("vqa") > tiny().flops_per_sample("vqa")


def test_the_layout_loss_reads_the_conditions_but_no_pixel_of_the_image_it_names():
    torch.manual_seed(0)
    model = tiny(layout_weight=1.0, ce_weight=0.0, flow_weight=0.0, sem_cell_weight=0.0, gen_cell_weight=0.0)
    assert not hasattr(tiny(), "layout")  # off: no head, so checkpoints without one still load
    batch = collate(samples("t2i", 2) + samples("edit", 2), model.cfg, TOK)
    noise = model.draw_noise(batch)
    total, parts = model.loss(batch, noise)
    chance = sum(torch.log(torch.tensor(float(k))) for k in M.CELL_CLASSES) / 3
    assert set(parts) >= {"layout"} and "gen_cells" not in parts and abs(parts["layout"] - chance) < 0.3
    torch.testing.assert_close(total, parts["layout"])
    # the BOI output it reads has seen the caption (and an edit's semantic source), not the noisy target
    # nor the clean pixel source after it: its gradient reaches neither the pixel embedding nor the head
    total.backward()
    reached = lambda p: p.grad is not None and bool(p.grad.any())
    assert reached(model.tok_emb.weight) and reached(model.enc_in.weight) and reached(model.blocks[0].und.qkv.weight)
    assert not reached(model.pix_in.weight) and not reached(model.t_mlp[0].weight)
    assert not any(reached(p) for p in model.head.parameters())


def test_pos_std_sets_the_scale_of_every_row_and_column_embedding():
    for std in (0.02, 0.5):
        torch.manual_seed(0)
        model = tiny(pos_std=std)
        for table in (model.enc_pos, model.sem_pos, model.pix_pos):  # 2 x 4 x 128 draws each
            assert abs(table.std().item() / std - 1) < 0.1


def test_canvas_gives_t2i_the_blank_pixel_source_an_edit_reads():
    n = tiny().n
    plain, canvas = tiny().layouts["t2i"], tiny(canvas=True).layouts["t2i"]
    assert plain.clean.start == plain.clean.stop  # off: the layout old checkpoints were trained on
    assert canvas.T == plain.T + n and canvas.clean.stop == canvas.noisy.start
    assert (canvas.kind[canvas.clean] == M.CLEAN).all()
    g = int(n ** 0.5)  # the canvas is an image: its token (r, c) turns by (start + r, start + c)
    assert canvas.coords[canvas.clean][g + 2].tolist() == [canvas.clean.start + 1, canvas.clean.start + 2]
    for on in (False, True):
        torch.manual_seed(0)
        model = tiny(canvas=on)
        batch = collate(samples("t2i", 3), model.cfg, TOK)  # tokens of the model's layout
        total, _ = model.loss(batch)
        total.backward()
        # the blank's projection joins every noisy token only with the canvas
        assert (model.src_pix.weight.grad is not None and bool(model.src_pix.weight.grad.any())) == on
    x, vis = model.embed("t2i", batch["t2i"]["tokens"], x_t=torch.randn(3, n, 3 * 16 ** 2),
                         temb=torch.zeros(3, model.cfg.width))
    blank = model.pixel_tokens(torch.full((1, n, 3 * 16 ** 2), -1.0))
    torch.testing.assert_close(x[:, canvas.clean], blank.expand(3, -1, -1))
    assert vis[:, canvas.clean].all()
    assert model.flops_per_sample("t2i") > tiny().flops_per_sample("t2i")


def test_noisy_pos_gives_each_noisy_token_a_cell_that_survives_pure_noise():
    assert tiny().noisy_pos is None and "noisy_pos" not in tiny().state_dict()  # off: old checkpoints load
    torch.manual_seed(0)
    model = tiny(noisy_pos=0.5)
    pos = M.grid(model.noisy_pos)  # (N, C): the embedding of each noisy token's own cell
    for task, n in (("t2i", 3), ("edit", 3)):
        sub = collate(samples(task, n), model.cfg, TOK)[task]
        x_t = torch.randn(n, model.n, 3 * 16 ** 2)  # t = 1: the noisy image is pure noise
        args = (task, sub["tokens"], sub.get("sem"), sub.get("source"), x_t,
                torch.zeros(n, model.cfg.width), torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool))
        x, _ = model.embed(*args)
        with torch.no_grad():
            saved = model.noisy_pos.clone()
            model.noisy_pos.zero_()
            x0, _ = model.embed(*args)
            model.noisy_pos.copy_(saved)
        noisy = model.layouts[task].noisy
        torch.testing.assert_close(x[:, noisy] - x0[:, noisy], pos.expand(n, -1, -1).detach())
        rest = torch.ones(x.shape[1], dtype=torch.bool)
        rest[noisy] = False
        assert torch.equal(x[:, rest], x0[:, rest])  # only the noisy image's tokens get it
        # at t = 1 each token's cell is the embedding nearest to it; pix_pos alone is lost in the noise
        cell = torch.arange(model.n).expand(n, -1)
        assert ((x[:, noisy] @ pos.T).argmax(-1) == cell).float().mean() > 0.9
        pix = M.grid(model.pix_pos)
        assert ((x0[:, noisy] @ pix.T).argmax(-1) == cell).float().mean() < 0.5
    total, _ = model.loss(collate(samples("t2i", 3), model.cfg, TOK))
    total.backward()
    assert model.noisy_pos.grad.abs().sum() > 0  # it trains
    with pytest.raises(ValueError, match="noisy_pos"):
        UMMConfig(noisy_pos=-1)

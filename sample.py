"""Use a trained nanoUMM: answer a question about an image, generate images from a prompt, or edit an
image with one or several instructions in turn (multi-round).

    python sample.py --ckpt out/pretrain --image shapes.png --question "What color is the circle?"
    python sample.py --ckpt out/pretrain --prompt "A red square above a circle." --n 8 --cfg 3
    python sample.py --ckpt out/uniedit --image shapes.png --edit "Remove the circle." --edit "Paint the square blue."
    python sample.py --ckpt out/uniedit --from_synth uniedit:val:7      # input (and truth) from the synthesized sets
    python sample.py --ckpt out/pretrain --from_synth vqa:test_ood:3 --weights model
    python sample.py --bench 512 --preset base          # sampling throughput at batch 512 (random weights)

--ckpt takes a step_NNNNNN folder or a run folder (its newest checkpoint), EMA weights unless
--weights model. --from_synth task:split:index takes the image and text of
synth.make_sample(world, task, split, index) for the checkpoint's world; --question, --prompt or
--edit replace its text, and the ground truth (answer, target image) is shown beside the output.

Outputs, under --out (default out/sample): generation writes gen_00.png ... (native size, so they
can be fed back with --image) and grid.png (4x, for the eye); editing writes step_0.png (the input),
step_1.png ... (one per instruction, each edited from the previous output) and strip.png. A call
removes the gen_NN.png (or step_N.png and target.png) that an earlier one left there, so a folder
never mixes two sets; every PNG is written under a temporary name and renamed. With --from_synth
the images are also judged by synth.parse and the verdict printed.

Input is refused with a one-line error, before any compute, when: --out cannot be written; a
question, prompt or instruction is blank; a number is out of range (a NaN guidance scale, a
negative --bench); the checkpoint is missing or corrupt; an image is not the model's size (pass
--resize to scale it, nearest-neighbour so the palette survives); a word is outside the model's
vocabulary, i.e. it encodes to [UNK] or (case aside) never occurs as a whole word in the
synthesized text of the checkpoint's world, where BPE would split it into pieces the model never
saw together; or the text is longer than the model's text slot.

--bench B times sampling at batch B, the checkpoint's model or with --preset a randomly initialised one
(the weights do not change the time): VQA answers/s (greedy, answer slot, KV cache) and T2I images/s at
--steps Euler steps with guidance (2 passes a step), bf16 autocast on CUDA, median of 5 runs after one
warm-up.
"""
import argparse
import os
import re
import sys
from dataclasses import asdict
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

import eval as ev
import kernels
import synth
import train
from model import UMM, UMMConfig, collate, euler


@lru_cache(maxsize=None)
def known_words(world, n=400):
    """Every lower-case word of n samples of each task in train and test_ood (what the tokenizer learnt from)."""
    words = set()
    for task in synth.TASKS:
        for split in ("train", "test_ood"):
            for i in range(n):
                s = synth.make_sample(world, task, split, i)
                for text in (s["text"], s["answer"] or "", s["probe"]["question"] if s["probe"] else ""):
                    words.update(re.findall(r"[a-z0-9]+", text.lower()))
    return words


def check_text(text, tok, world):
    if "[UNK]" in tok.encode(text).tokens:
        bad = [w for w in text.split(" ") if "[UNK]" in tok.encode(w).tokens]  # Metaspace splits at " " alone
        raise ValueError(f"{bad[0]!r} holds characters the tokenizer does not know")
    unknown = [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in known_words(world)]
    if unknown:
        raise ValueError(f"word {unknown[0]!r} is outside the model's vocabulary (the shapes world's words: "
                         f"e.g. {', '.join(world.shapes[:2])}, {', '.join(world.colors[:2])}, row, column, left)")


def read_image(path, size, resize):
    try:
        im = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    if im.size != (size, size):
        if not resize:
            raise ValueError(f"image {path} is {im.size[0]}x{im.size[1]} px, the model needs {size}x{size}: "
                             f"pass --resize to scale it")
        im = im.resize((size, size), Image.NEAREST)
    return np.array(im)


def check_out(folder):
    """Make --out, or refuse it, before any compute: an unwritable path costs nothing."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {folder} cannot be made ({e.strerror}): pass a writable "
                         f"folder") from None
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {folder} is not writable: pass a writable folder")


def clear(folder, names):
    """Remove the images of an earlier call, whose names fullmatch the regex `names`, so that a
    fresh set never mixes with an old one."""
    for name in os.listdir(folder):
        if re.fullmatch(names, name):
            os.remove(os.path.join(folder, name))


def save(img, path, scale=1):
    """Write a PNG whole (temp + rename): a crash never leaves a cut image under the name."""
    im = Image.fromarray(img)
    big = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    big.save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)
    return path


def row(images, gap=2):
    """Images side by side with a grey gap: (S, n S + gaps, 3)."""
    S = images[0].shape[0]
    out = np.full((S, len(images) * (S + gap) - gap, 3), 96, np.uint8)
    for i, im in enumerate(images):
        out[:, i * (S + gap):i * (S + gap) + S] = im
    return out


def from_synth(spec, world):
    parts = spec.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        raise ValueError(f"--from_synth {spec!r} is not task:split:index (e.g. uniedit:val:7)")
    return synth.make_sample(world, parts[0], parts[1], int(parts[2]))


@torch.no_grad()
def bench(model, tok, world, batch, sampling, device, repeats=5):
    """Print and return the sampling throughput at `batch` samples per call (see the docstring)."""
    model.eval()
    qs = [{**synth.make_sample(world, "vqa", "val", i), "answer": None} for i in range(batch)]
    ps = [{**synth.make_sample(world, "t2i", "val", i), "target": None} for i in range(batch)]
    vqa = ev.on(device, collate(qs, model.cfg, tok)["vqa"])
    t2i = ev.on(device, collate(ps, model.cfg, tok)["t2i"])
    noise = torch.randn(batch, 3, world.size, world.size, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    guided = lambda x, t: model.guided_velocity("t2i", t2i, x, t, sampling.cfg)

    with amp:
        answering = kernels.median_seconds(lambda: model.generate_text(vqa), device, repeats)
        drawing = kernels.median_seconds(lambda: euler(guided, noise, sampling.steps, sampling.shift),
                                         device, repeats)
    r = {"answers_per_s": batch / answering, "images_per_s": batch / drawing}
    print(f"width {model.cfg.width}, batch {batch}, {kernels.device_name(device)}: "
          f"{r['answers_per_s']:,.1f} VQA answers/s (KV cache), {r['images_per_s']:,.1f} T2I "
          f"images/s ({sampling.steps} Euler steps, guidance {sampling.cfg})")
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description="Answer, generate or edit with a nanoUMM checkpoint (see the docstring).")
    p.add_argument("--ckpt", help="a step_NNNNNN folder, or a run folder (its newest checkpoint)")
    p.add_argument("--weights", default="ema", help="ema (default) or model (the raw weights)")
    p.add_argument("--bench", type=int, default=0, metavar="B", help="time sampling at batch B instead")
    p.add_argument("--preset", help="with --bench and no --ckpt: a random model of this preset")
    p.add_argument("--image", help="input PNG for --question and --edit")
    p.add_argument("--question", help="answer this question about --image")
    p.add_argument("--prompt", help="generate --n images from this prompt")
    p.add_argument("--edit", action="append", help="an instruction; repeat for several rounds, applied in turn")
    p.add_argument("--from_synth", metavar="TASK:SPLIT:INDEX", help="take the input from the synthesized sets")
    p.add_argument("--n", type=int, default=8, help="images per prompt")
    p.add_argument("--resize", action="store_true", help="scale an --image of another size to the model's")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling noise")
    p.add_argument("--out", default="out/sample", help="folder for the PNGs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for k, v in asdict(ev.Sampling()).items():
        p.add_argument(f"--{k}", type=type(v), default=v)
    a = p.parse_args(argv)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("sample.py runs as one process: start it with python, not torchrun")
        if sum(x is not None for x in (a.question, a.prompt, a.edit)) > 1:
            raise ValueError("give one of --question, --prompt and --edit")
        if a.n < 1:
            raise ValueError(f"--n must be at least 1, got {a.n}")
        if a.bench < 0:
            raise ValueError(f"--bench {a.bench} is out of range: it must be >= 0 (0: no timing)")
        texts = [("--question", a.question), ("--prompt", a.prompt)]
        texts += [("--edit", e) for e in a.edit or []]
        for flag, text in texts:
            if text is not None and not text.strip():
                raise ValueError(f"{flag} is blank: give the text itself")
        sampling = ev.Sampling(**{k: getattr(a, k) for k in asdict(ev.Sampling())})
        if a.bench and not a.ckpt:
            if a.preset not in train.PRESETS:
                *rest, last = train.PRESETS
                raise ValueError(f"--bench without --ckpt needs --preset {', '.join(rest)} or {last}, got {a.preset!r}")
            world = synth.get_world(train.PRESETS[a.preset].get("world", train.TrainConfig.world))
            tok = synth.get_tokenizer(world.name)
            torch.manual_seed(a.seed)
            model = UMM(UMMConfig.preset(a.preset, vocab_size=tok.get_vocab_size(), image_size=world.size))
            return bench(model.to(a.device), tok, world, a.bench, sampling, torch.device(a.device))
        if not a.ckpt:
            raise ValueError("pass --ckpt CHECKPOINT")
        if not a.bench:
            check_out(a.out)
        model, tok, world, _, _ = ev.load(a.ckpt, a.weights, a.device)
        if a.bench:
            return bench(model, tok, world, a.bench, sampling, torch.device(a.device))
        truth = None  # the synthesized sample, when its own text is used: its answer or target is known
        image = read_image(a.image, world.size, a.resize) if a.image else None
        if a.from_synth:
            s = from_synth(a.from_synth, world)
            image = s["image"] if image is None else image
            if a.question is None and a.prompt is None and a.edit is None:  # the sample's own text and task
                if s["task"] == "vqa":
                    a.question = s["text"]
                elif s["task"] == "t2i":
                    a.prompt = s["text"]
                else:
                    a.edit = [s["text"]]
                truth = s
        if a.question is None and a.prompt is None and a.edit is None:
            raise ValueError("give --question, --prompt, --edit or --from_synth")
        if a.prompt is None and image is None:
            raise ValueError("--question and --edit need --image (or --from_synth with an image)")
        for text in [a.question, a.prompt] + (a.edit or []):
            if text is not None:
                check_text(text, tok, world)

        if a.question is not None:
            said = ev.answer(model, tok, [{"text": a.question, "image": image}], a.device)[0]
            print(f"Q: {a.question}\nA: {said}" + (f"   (truth: {truth['answer']})" if truth else ""))
        elif a.prompt is not None:
            sample = {"task": "t2i", "text": a.prompt}
            images = ev.draw(model, tok, [sample] * a.n, [("prompt", a.prompt, k) for k in range(a.n)], sampling,
                             a.seed, a.device)
            clear(a.out, r"gen_\d\d+\.png")
            for k, im in enumerate(images):
                save(im, os.path.join(a.out, f"gen_{k:02d}.png"))
            print(f"wrote {a.n} images and {save(row(list(images)), os.path.join(a.out, 'grid.png'), 4)}")
            if truth:
                right = sum(ev.judge_t2i(im, truth, world)["strict"] for im in images)
                print(f"ShapeEval-strict: {right}/{a.n} images hold exactly the prompt's objects")
        else:
            steps = [image]
            # unpadded numbers only: a training run's grids, samples/step_000100.png, stay
            clear(a.out, r"step_(0|[1-9]\d*)\.png|target\.png")
            save(image, os.path.join(a.out, "step_0.png"))
            for r, text in enumerate(a.edit, 1):
                edit = {"task": "edit", "text": text, "image": steps[-1]}
                steps.append(ev.draw(model, tok, [edit], [("edit", text, r)], sampling, a.seed, a.device)[0])
                print(f"round {r}: {text} -> {save(steps[-1], os.path.join(a.out, f'step_{r}.png'))}")
            if truth:
                save(truth["target"], os.path.join(a.out, "target.png"))
                j = ev.judge_edit(steps[-1], truth, world)
                print(f"edit {'succeeded' if j['success'] else 'failed'}: {j['followed']}/{j['should_change']} cells "
                      f"changed as the target, {j['kept']}/{j['should_stay']} other cells kept "
                      f"(target: {a.out}/target.png)")
                steps.append(truth["target"])
            print(f"strip: {save(row(steps), os.path.join(a.out, 'strip.png'), 4)}")
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

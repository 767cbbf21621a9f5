"""The shapes world: scenes, an exact renderer and parser, and every task nanoUMM trains on.

A scene is a few objects (shape, color, size) on a G x G grid, at most one per cell. Because
the world is tiny and rendered exactly, every question has a known answer, every edit has a
known target image, and `parse` turns any image (a clean render or a model's attempt) back
into a scene, so it can judge generation and editing.

Tasks, each a pure function of (world, task, split, index, seed) -- see `make_sample`:
  vqa      understanding: a question program over the scene, a one-word answer
  t2i      generation: a prompt plus GenEval's include/exclude clauses and the exact set of
           objects it describes, by which any image can be judged
  edit     simple edits: add/remove/recolor/resize/reshape/move/swap, object named directly
  uniedit  intelligent edits (the Uni-Edit task): a VQA program embedded in the instruction,
           so the edit is right only if the question is answered right; the question and its
           answer are kept as the sample's `probe`

Run it:
  python synth.py --out data/demo --n 2000                 # dataset folder + contact.png
  python synth.py --out data/uniedit-148k --preset uniedit-148k
  python synth.py --show data/demo --n 16                  # contact sheet of a folder
  python synth.py --show --world tiny --tasks uniedit      # contact sheet made on the fly
  python synth.py --bench                                  # samples/s of on-the-fly synthesis
"""
import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, asdict
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

VERSION = 2  # 2: the 64 px tiny world and new templates; datasets of version 1 are refused
TASKS = ("vqa", "t2i", "edit", "uniedit")
SPLITS = ("train", "val", "test", "test_ood")
SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[BOI]", "[EOI]", "[SEP]", "[UNK]")

# ----------------------------------------------------------------------------- world

PALETTE = {  # at least 127 apart in RGB, so a noisy pixel still has an unambiguous nearest color
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "magenta": (255, 0, 255), "cyan": (0, 255, 255), "orange": (255, 128, 0),
    "white": (255, 255, 255),
}

# Pixels each shape spans in its cell, per size: the circle's diameter, the square's side, the
# triangle's and diamond's height, the cross's arm length (its bars are BAR_PX wide). Chosen so that
# any two (shape, size) templates differ in at least TEMPLATE_MARGIN of the pixels of their union,
# even offset by up to 2 px (the parser tries +-1 px on each; measured minimum 0.29), and so that
# a 3x3 blur leaves a cell read right or rejected (tests/test_synth.py): 48 px cells could not.
SHAPE_PX = (("large", (("circle", 15), ("square", 11), ("triangle", 13), ("diamond", 15),
                       ("cross", 15))),
            ("small", (("circle", 9), ("square", 7), ("triangle", 9), ("diamond", 7),
                       ("cross", 9))))
BAR_PX = 3  # 3 px bars survive a 3x3 blur; 1 px ones vanish
TEMPLATE_MARGIN = 0.25


@dataclass(frozen=True)
class World:
    name: str
    size: int  # image side in px
    grid: int  # cells per side
    shape_px: tuple = SHAPE_PX  # needs cells of 16 px: the largest span plus a 1 px gutter
    shapes: tuple = ("circle", "square", "triangle", "diamond", "cross")
    colors: tuple = tuple(PALETTE)
    max_objects: int = 5  # train/val/test scenes; test_ood also has max_objects + 1
    heldout: tuple = (("triangle", "red"), ("circle", "cyan"), ("cross", "yellow"),
                      ("diamond", "green"), ("square", "magenta"))  # only in test_ood

    @property
    def cell(self):
        return self.size // self.grid

    @property
    def sizes(self):
        return tuple(s for s, _ in self.shape_px)


WORLDS = {  # the tiny model reads the same pixels as the small and base ones, one patch per cell
    "default": World("default", size=64, grid=4),
    "tiny": World("tiny", size=64, grid=4),
}


def get_world(world):
    if isinstance(world, World):
        return world
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}: choose one of {', '.join(WORLDS)}")
    return WORLDS[world]


def world_from_json(d):
    """A World from its asdict() after a JSON round trip (lists back to tuples, at any depth)."""
    tuples = lambda v: tuple(map(tuples, v)) if isinstance(v, list) else v
    return World(**{k: tuples(v) for k, v in d.items()})


class Obj(NamedTuple):
    shape: str
    color: str
    size: str
    row: int
    col: int


@dataclass(frozen=True)
class Scene:
    objects: tuple  # Obj, sorted by (row, col)
    malformed: tuple = ()  # (row, col) cells the parser could not read; a judge counts them wrong

    @staticmethod
    def of(objs):
        return Scene(tuple(sorted((Obj(*o) for o in objs), key=lambda o: (o.row, o.col))))

    def to_json(self):
        return [list(o) for o in self.objects]


# ----------------------------------------------------------------------------- render / parse

@lru_cache(maxsize=None)
def templates(world):
    """(shape, size) -> bool (cell, cell) mask; rendering stamps them. Each shape is centred on
    the pixel (c - 2) // 2, so odd spans are symmetric and the cell's last row and column stay
    empty: a gutter between neighbours."""
    c = world.cell
    spans = {size: dict(px) for size, px in world.shape_px}
    if max(max(px.values()) for px in spans.values()) > c - 1:
        raise ValueError(f"world {world.name!r}: shapes of {spans} px need cells of at least "
                         f"{max(max(px.values()) for px in spans.values()) + 1} px, not {c}")
    m = (c - 2) // 2
    dy, dx = np.mgrid[0:c, 0:c] - m  # offsets from the centre pixel
    out = {}
    for size, px in spans.items():
        for shape in world.shapes:
            h = px[shape] // 2
            if shape == "circle":
                mask = dx ** 2 + dy ** 2 <= (px[shape] / 2) ** 2
            elif shape == "square":
                mask = (abs(dx) <= h) & (abs(dy) <= h)
            elif shape == "triangle":  # apex up, widening by 2 px every 2 rows
                mask = (abs(dy) <= h) & (abs(dx) <= (dy + h) // 2)
            elif shape == "diamond":
                mask = abs(dx) + abs(dy) <= h
            else:  # cross
                bar = BAR_PX // 2
                mask = ((abs(dx) <= bar) & (abs(dy) <= h)) | ((abs(dy) <= bar) & (abs(dx) <= h))
            out[shape, size] = mask
    return out


def render(scene, world="default"):
    """Scene (or list of objects) -> uint8 (H, W, 3) image on a black background."""
    w = get_world(world)
    objs = scene.objects if isinstance(scene, Scene) else scene
    img = np.zeros((w.size, w.size, 3), np.uint8)
    tm, c = templates(w), w.cell
    for shape, color, size, r, col in objs:
        img[r * c:(r + 1) * c, col * c:(col + 1) * c][tm[shape, size]] = PALETTE[color]
    return img


_PAL = np.array([(0, 0, 0)] + list(PALETTE.values()), np.float32)  # index 0 is the background
_PAL_NAMES = [None] + list(PALETTE)

# The parser's gates. A cell reads as an object only when every gate passes, else it is malformed.
INK = 64.0  # a pixel is ink (something is drawn there) when it and the mean of its 3x3
# neighbourhood are this far from black: a quarter of a primary's brightness; the mean ignores
# isolated noise
COLOR_GATE = 60.0  # the object's mean color lies this close to its palette color; a palette color
# dimmed by any factor or brightened up to 1.4x stays >= 89 from every other one, so noise has ~30
AGREE = 0.8  # share of the object's pixels whose nearest palette color is the majority's
SHAPE_GATE = 0.12  # Jaccard distance (share of the union's pixels that differ) to the best template
SHAPE_WIN = 0.05  # ... and the best other (shape, size) must be this much farther
# So a reading is never wrong for a drawing within TEMPLATE_MARGIN - SHAPE_GATE = 0.13 of its
# template: the triangle inequality of the Jaccard distance puts every other one beyond the gate.


def parse(image, world="default"):
    """Image -> Scene, cell by cell. A cell with almost no ink is empty. Otherwise its foreground
    (pixels nearest a palette color other than black) must agree on one color whose mean is near
    the palette's, and match one (shape, size) template, at the best of +-1 px shifts, closely and
    clearly better than any other; if not, the cell is `malformed`, never misread and never an
    exception, whatever the image holds."""
    w = get_world(world)
    img = np.asarray(image)
    if img.shape != (w.size, w.size, 3):
        raise ValueError(f"parse: image has shape {img.shape}, world {w.name!r} needs "
                         f"({w.size}, {w.size}, 3)")
    x = img.astype(np.float32).reshape(-1, 3)
    # squared distance to each palette color, |x|^2 - 2 x.p + |p|^2: exact, all terms are integers
    d2 = (x * x).sum(1, keepdims=True) - 2 * x @ _PAL.T + (_PAL * _PAL).sum(1)  # (H*W, 9)
    near = d2.argmin(1).reshape(w.size, w.size)
    black = np.sqrt(d2[:, 0]).reshape(w.size, w.size)  # each pixel's distance from black
    around = sum(shifted(black, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    ink = (black >= INK) & (around >= INK)
    keys, stack = _template_stack(w)
    min_ink = min(int(m.sum()) for m in templates(w).values()) // 4
    c, objs, bad = w.cell, [], []
    for r in range(w.grid):
        for col in range(w.grid):
            cell = np.s_[r * c:(r + 1) * c, col * c:(col + 1) * c]
            if ink[cell].sum() < min_ink:  # a few stray pixels are noise, not an object
                continue
            obj = _read_cell(img[cell], near[cell], keys, stack)
            if obj is None:
                bad.append((r, col))
            else:
                objs.append(Obj(obj[0], obj[1], obj[2], r, col))
    return Scene(tuple(objs), tuple(bad))


def _read_cell(pixels, near, keys, stack):
    """(shape, color, size) of one cell's object, or None when a gate fails."""
    fg = near > 0
    n = int(fg.sum())
    if n == 0:
        return None
    votes = np.bincount(near[fg], minlength=len(_PAL))
    k = int(votes.argmax())
    mean = pixels[near == k].astype(np.float32).mean(0)
    if votes[k] < AGREE * n or np.sqrt(((mean - _PAL[k]) ** 2).sum()) > COLOR_GATE:
        return None
    dist = 1 - (stack & fg).sum((1, 2)) / (stack | fg).sum((1, 2))  # Jaccard distance, per shift
    best = {}
    for key, d in zip(keys, dist):
        best[key] = min(best.get(key, 1.0), d)
    first, second = sorted(best, key=best.get)[:2]
    if best[first] > SHAPE_GATE or best[second] - best[first] < SHAPE_WIN:
        return None
    return first[0], _PAL_NAMES[k], first[1]


@lru_cache(maxsize=None)
def _template_stack(w):
    """Every template at every +-1 px shift: (K, cell, cell) plus its (shape, size) keys."""
    keys, stack = [], []
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    for dy, dx in shifts:
        for k, m in templates(w).items():
            keys.append(k)
            stack.append(shifted(m, dy, dx))
    return keys, np.stack(stack)


def shifted(a, dy, dx):
    """`a` moved by (dy, dx) px along its first two axes, filled with zeros (np.roll would wrap)."""
    h, w = a.shape[:2]
    out = np.zeros_like(a)
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        a[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def template_distance(a, b):
    """Jaccard distance of two masks: the share of the pixels of their union where they differ."""
    return float((a ^ b).sum() / (a | b).sum())


# ----------------------------------------------------------------------------- programs
# Descriptions, references, sets and questions are plain JSON lists, so every sample carries
# its program and anyone can re-run it on a parsed scene (`answer`) to check a model.
#   desc       {"size": .., "color": .., "shape": ..} (any subset)
#   reference  ["the", desc] | ["rel", "left"|"right"|"above"|"below", ref] | ["near", ref]
#              | ["far", ref] | ["most", "left"|"right"|"top"|"bottom"]      -> exactly one object
#   set        ["all", desc] | ["or", desc, desc] | ["and", desc, desc]
#   question   ["query", attr, ref] | ["exist", desc] | ["count", set]
#              | ["pos", "row"|"column", ref]
#              | ["same", attr, ref] | ["compare", "more"|"fewer"|"equal", set, set]
#              | ["equal", attr, ref, ref]                                  -> a one-word answer

ATTRS = ("shape", "color", "size")
STEP = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}
REL_TEXT = {"left": "directly left of", "right": "directly right of", "above": "directly above",
            "below": "directly below"}
MOST_KEY = {"left": lambda o: o.col, "right": lambda o: -o.col, "top": lambda o: o.row,
            "bottom": lambda o: -o.row}


class Invalid(Exception):
    """A reference that does not pick exactly one object, or a draw the generator rejects."""


def matches(o, desc):
    return all(getattr(o, k) == v for k, v in desc.items())


def resolve(ref, objs):
    op = ref[0]
    if op == "the":
        hits = [o for o in objs if matches(o, ref[1])]
    elif op == "rel":
        a = resolve(ref[2], objs)
        dr, dc = STEP[ref[1]]
        hits = [o for o in objs if (o.row, o.col) == (a.row + dr, a.col + dc)]
    elif op in ("near", "far"):
        a = resolve(ref[1], objs)
        others = [o for o in objs if o != a]
        d = [(o.row - a.row) ** 2 + (o.col - a.col) ** 2 for o in others]
        best = (min if op == "near" else max)(d, default=None)
        hits = [o for o, x in zip(others, d) if x == best]
    else:  # most
        key = MOST_KEY[ref[1]]
        best = min((key(o) for o in objs), default=None)
        hits = [o for o in objs if key(o) == best]
    if len(hits) != 1:
        raise Invalid(ref)
    return hits[0]


def members(s, objs):
    if s[0] == "all":
        return [o for o in objs if matches(o, s[1])]
    if s[0] == "or":
        return [o for o in objs if matches(o, s[1]) or matches(o, s[2])]
    return [o for o in objs if matches(o, s[1]) and matches(o, s[2])]


def answer(q, objs):
    """Run a question program on a list of objects (a Scene's .objects); returns a word."""
    op = q[0]
    yn = lambda b: "yes" if b else "no"
    if op == "query":
        return getattr(resolve(q[2], objs), q[1])
    if op == "exist":
        return yn(any(matches(o, q[1]) for o in objs))
    if op == "count":
        return str(len(members(q[1], objs)))
    if op == "pos":
        o = resolve(q[2], objs)
        return str((o.row if q[1] == "row" else o.col) + 1)
    if op == "same":
        o = resolve(q[2], objs)
        return str(sum(x != o and getattr(x, q[1]) == getattr(o, q[1]) for x in objs))
    if op == "compare":
        a, b = len(members(q[2], objs)), len(members(q[3], objs))
        return yn({"more": a > b, "fewer": a < b, "equal": a == b}[q[1]])
    if op == "equal":
        return yn(getattr(resolve(q[2], objs), q[1]) == getattr(resolve(q[3], objs), q[1]))
    raise ValueError(f"unknown program op {op!r}")


def plural(word):
    return word + ("es" if word.endswith("s") else "s")


def noun(desc, many=False):
    """{"size": "small", "color": "red"} -> "small red object" (or "objects")."""
    head = desc.get("shape", "object")
    words = [desc[k] for k in ("size", "color") if k in desc]
    return " ".join(words + [plural(head) if many else head])


def a_(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def cell_text(cell):
    return f"row {cell[0] + 1}, column {cell[1] + 1}"


def ref_text(ref):
    op = ref[0]
    if op == "the":
        return "the " + noun(ref[1])
    if op == "rel":
        return f"the object {REL_TEXT[ref[1]]} {ref_text(ref[2])}"
    if op == "near":
        return "the object closest to " + ref_text(ref[1])
    if op == "far":
        return "the object farthest from " + ref_text(ref[1])
    return f"the {ref[1]}most object"


def set_text(s):
    if s[0] == "all":
        return noun(s[1], many=True)
    word = lambda d: next(iter(d.values()))  # or/and sets are single adjectives: "red", "small"
    return f"{word(s[1])} or {word(s[2])} objects" if s[0] == "or" else \
        f"objects that are both {word(s[1])} and {word(s[2])}"


def question_text(q):
    op = q[0]
    if op == "query":
        t = f"what {q[1]} is {ref_text(q[2])}?"
    elif op == "exist":
        t = f"is there {a_(noun(q[1]))}?"
    elif op == "count":
        t = f"how many {set_text(q[1])} are there?"
    elif op == "pos":
        t = f"in which {q[1]} is {ref_text(q[2])}?"
    elif op == "same":
        t = f"how many other objects have the same {q[1]} as {ref_text(q[2])}?"
    elif op == "compare":
        a, b = set_text(q[2]), set_text(q[3])
        t = {"more": f"are there more {a} than {b}?", "fewer": f"are there fewer {a} than {b}?",
             "equal": f"are there as many {a} as {b}?"}[q[1]]
    else:
        t = f"do {ref_text(q[2])} and {ref_text(q[3])} have the same {q[1]}?"
    return t[0].upper() + t[1:]


# ----------------------------------------------------------------------------- scene sampling

def values(w, attr):
    return {"shape": w.shapes, "color": w.colors, "size": w.sizes}[attr]


def allowed(o, w, split):
    return split == "test_ood" or (o.shape, o.color) not in w.heldout


def rand_obj(rng, w, split, cell, **fixed):
    """A random object in `cell`, some attributes fixed, never a held-out combo outside test_ood."""
    for _ in range(50):
        o = Obj(fixed.get("shape") or rng.choice(w.shapes),
                fixed.get("color") or rng.choice(w.colors),
                fixed.get("size") or rng.choice(w.sizes), *cell)
        if allowed(o, w, split):
            return o
    raise Invalid("no allowed object")


def max_objects(w, split):
    return w.max_objects + (split == "test_ood")  # the held-out count appears only in test_ood


def rand_scene(rng, w, split, lo=1, hi=None, n=None):
    n = n or rng.randint(lo, hi or max_objects(w, split))
    cells = rng.sample(range(w.grid * w.grid), n)
    return [rand_obj(rng, w, split, divmod(c, w.grid)) for c in cells]


def empty_cells(w, objs):
    taken = {(o.row, o.col) for o in objs}
    return [divmod(c, w.grid) for c in range(w.grid * w.grid) if divmod(c, w.grid) not in taken]


DESC_KEYS = [("shape",), ("color",), ("size",), ("color", "shape"), ("size", "shape"),
             ("size", "color"), ("size", "color", "shape")]  # shortest first


def describe(o, objs, rng, avoid=()):
    """A description that picks `o` alone among `objs`, without the attributes in `avoid`."""
    uniq = [ks for ks in DESC_KEYS if not set(ks) & set(avoid)
            and sum(all(getattr(x, k) == getattr(o, k) for k in ks) for x in objs) == 1]
    if not uniq:
        return None
    short = [ks for ks in uniq if len(ks) == len(uniq[0])]
    ks = rng.choice(short if rng.random() < 0.7 else uniq)
    return {k: getattr(o, k) for k in ks}


def make_ref(rng, objs, t, hops, avoid=()):
    """A reference to `t` that takes `hops` relation steps (0 = a direct description), or None."""
    if hops == 0:
        d = describe(t, objs, rng, avoid)
        return d and ["the", d]
    kinds = ("left", "right", "above", "below", "near", "far")
    cands = [(kind, a) for a in objs if a != t for kind in kinds]
    rng.shuffle(cands)
    for kind, a in cands:
        if kind in STEP and (a.row + STEP[kind][0], a.col + STEP[kind][1]) != (t.row, t.col):
            continue
        inner = make_ref(rng, objs, a, hops - 1)
        if inner is None or t in chain(inner, objs):  # never "the object next to the one next to t"
            continue
        ref = ["rel", kind, inner] if kind in STEP else [kind, inner]
        try:
            if resolve(ref, objs) == t:
                return ref
        except Invalid:
            pass
    return None


def chain(ref, objs):
    """Every object a reference passes through, itself included."""
    inner = ref[2] if ref[0] == "rel" else ref[1] if ref[0] in ("near", "far") else None
    return [resolve(ref, objs)] + (chain(inner, objs) if inner else [])


# ----------------------------------------------------------------------------- VQA
# Each family first draws the answer uniformly, then builds a scene and question that have it,
# so answers are balanced within a family by construction. Returns (objs, program, hops).

TRIES = 50


def _retry(build):
    """Run `build()` until it stops raising Invalid (each draw consumes the sample's own rng)."""
    for _ in range(TRIES):
        try:
            return build()
        except Invalid:
            pass
    raise Invalid("no draw succeeded")


def any_answer(rng, w, attr):
    """A uniform answer over one attribute, or over all of them (attr=None), and its attribute."""
    if attr is None:
        ans = rng.choice([v for a in ATTRS for v in values(w, a)])
        return next(a for a in ATTRS if ans in values(w, a)), ans
    return attr, rng.choice(values(w, attr))


def vqa_query(rng, w, split, attr, hops):
    attr, ans = any_answer(rng, w, attr)

    def build():
        objs = rand_scene(rng, w, split, lo=1 + hops)
        i = rng.randrange(len(objs))
        objs[i] = objs[i]._replace(**{attr: ans})
        ref = make_ref(rng, objs, objs[i], hops, avoid=(attr,))
        if ref is None or not allowed(objs[i], w, split):
            raise Invalid
        return objs, ["query", attr, ref], hops
    return _retry(build)


def vqa_extreme(rng, w, split):
    side = rng.choice(list(MOST_KEY))
    attr, ans = any_answer(rng, w, None)

    def build():
        objs = rand_scene(rng, w, split)
        t = resolve(["most", side], objs)
        objs[objs.index(t)] = t = t._replace(**{attr: ans})
        if not allowed(t, w, split):
            raise Invalid
        return objs, ["query", attr, ["most", side]], 0
    return _retry(build)


def rand_desc(rng, w, n_attrs):
    keys = sorted(rng.sample(ATTRS, n_attrs), key=ATTRS.index)
    return {k: rng.choice(values(w, k)) for k in keys}


def fill(rng, w, split, objs, n, avoid):
    """Add up to `n` random objects in empty cells, none matching any desc in `avoid`."""
    for cell in rng.sample(empty_cells(w, objs), n):
        o = rand_obj(rng, w, split, cell)
        if not any(matches(o, d) for d in avoid):
            objs.append(o)
    return objs


def place(rng, w, split, k, desc, objs=None):
    """`objs` plus k new objects matching `desc` in random empty cells."""
    objs = objs or []
    for cell in rng.sample(empty_cells(w, objs), k):
        objs.append(rand_obj(rng, w, split, cell, **desc))
    return objs


def vqa_count(rng, w, split):
    m = max_objects(w, split)
    k = rng.randint(0, m)

    def build():
        d = rand_desc(rng, w, rng.choice((1, 1, 2)))
        objs = fill(rng, w, split, place(rng, w, split, k, d), rng.randint(int(k == 0), m - k), [d])
        if not objs:
            raise Invalid
        return objs, ["count", ["all", d]], 0
    return _retry(build)


def vqa_exist(rng, w, split):
    yes = rng.random() < 0.5

    def build():
        d = rand_desc(rng, w, rng.choice((2, 2, 3)))
        objs = fill(rng, w, split, place(rng, w, split, int(yes), d),
                    rng.randint(1, max_objects(w, split) - 1), [d])
        return objs, ["exist", d], 0
    return _retry(build)


def vqa_position(rng, w, split):
    axis, ans = rng.choice(("row", "column")), rng.randrange(w.grid)

    def build():
        cell = (ans, rng.randrange(w.grid)) if axis == "row" else (rng.randrange(w.grid), ans)
        t = rand_obj(rng, w, split, cell)
        objs = fill(rng, w, split, [t], rng.randint(0, max_objects(w, split) - 1), [])
        ref = make_ref(rng, objs, t, 0)
        if ref is None:
            raise Invalid
        return objs, ["pos", axis, ref], 0
    return _retry(build)


def vqa_same(rng, w, split):
    attr = rng.choice(ATTRS)
    k = rng.randint(0, min(3, max_objects(w, split) - 1))  # other objects sharing the attribute

    def build():
        t = rand_obj(rng, w, split, divmod(rng.randrange(w.grid ** 2), w.grid))
        same = {attr: getattr(t, attr)}
        objs = fill(rng, w, split, place(rng, w, split, k, same, [t]), rng.randint(0, 2), [same])
        ref = make_ref(rng, objs, t, 0)
        if ref is None:
            raise Invalid
        return objs, ["same", attr, ref], 0
    return _retry(build)


def two_descs(rng, w, same_attr):
    """Two single-attribute descs: over one attribute (disjoint sets) or two (overlapping)."""
    a1 = rng.choice(ATTRS if same_attr else ("color", "size"))
    a2 = a1 if same_attr else ("size" if a1 == "color" else "color")
    if same_attr:
        v1, v2 = rng.sample(values(w, a1), 2)
    else:
        v1, v2 = rng.choice(values(w, a1)), rng.choice(values(w, a2))
    return {a1: v1}, {a2: v2}


def vqa_compare(rng, w, split):
    op, yes = rng.choice(("more", "fewer", "equal")), rng.random() < 0.5
    truth = {"more": lambda a, b: a > b, "fewer": lambda a, b: a < b,
             "equal": lambda a, b: a == b}[op]
    pairs = [(a, b) for a in range(4) for b in range(4) if 0 < a + b <= 4 and truth(a, b) == yes]

    def build():
        a, b = rng.choice(pairs)
        dA, dB = two_descs(rng, w, same_attr=True)
        objs = place(rng, w, split, b, dB, place(rng, w, split, a, dA))
        objs = fill(rng, w, split, objs, rng.randint(0, 1), [dA, dB])
        return objs, ["compare", op, ["all", dA], ["all", dB]], 0
    return _retry(build)


def vqa_equal(rng, w, split):
    attr, yes = rng.choice(ATTRS), rng.random() < 0.5

    def build():
        objs = rand_scene(rng, w, split, lo=2)
        t1, t2 = rng.sample(objs, 2)
        others = [x for x in values(w, attr) if x != getattr(t1, attr)]
        v = getattr(t1, attr) if yes else rng.choice(others)
        objs[objs.index(t2)] = t2 = t2._replace(**{attr: v})
        r1 = make_ref(rng, objs, t1, 0, avoid=(attr,))
        r2 = make_ref(rng, objs, t2, 0, avoid=(attr,))
        if r1 is None or r2 is None or not allowed(t2, w, split):
            raise Invalid
        return objs, ["equal", attr, r1, r2], 0
    return _retry(build)


def vqa_and_or(rng, w, split):
    op = rng.choice(("or", "and"))
    k = rng.randint(0, 3)

    def build():
        d1, d2 = two_descs(rng, w, same_attr=(op == "or" and rng.random() < 0.5))
        s = [op, d1, d2]
        objs = fill(rng, w, split, [], rng.randint(1, max_objects(w, split)), [])
        hits = members(s, objs)
        rng.shuffle(hits)
        objs = [o for o in objs if o not in hits[k:]]  # drop hits beyond k ...
        both = {**d1, **d2} if op == "and" else rng.choice((d1, d2))
        objs = place(rng, w, split, k - len(hits[:k]), both, objs)  # ... or add the missing ones
        if not objs or len(members(s, objs)) != k or len(objs) > max_objects(w, split):
            raise Invalid
        return objs, ["count", s], 0
    return _retry(build)


VQA_FAMILIES = {
    "query_color": lambda rng, w, s: vqa_query(rng, w, s, "color", 0),
    "query_shape": lambda rng, w, s: vqa_query(rng, w, s, "shape", 0),
    "query_size": lambda rng, w, s: vqa_query(rng, w, s, "size", 0),
    "exist": vqa_exist,
    "count": vqa_count,
    "relate_1hop": lambda rng, w, s: vqa_query(rng, w, s, None, 1),
    "relate_2hop": lambda rng, w, s: vqa_query(rng, w, s, None, 2),
    "position": vqa_position,
    "same_count": vqa_same,
    "compare": vqa_compare,
    "attr_equal": vqa_equal,
    "and_or_count": vqa_and_or,
    "extreme": vqa_extreme,
}


def gen_vqa(rng, w, split, family):
    objs, prog, hops = VQA_FAMILIES[family](rng, w, split)
    ans = answer(prog, objs)
    return dict(scene=objs, text=question_text(prog), answer=ans, program=prog, hops=hops)


# ----------------------------------------------------------------------------- T2I
# GenEval's six categories plus full-scene captions. Every prompt carries two checks any image can
# be judged by:
#   geneval    GenEval's metadata: "include" [{"shape", "count", "color"?, "position"?}] (at least
#              count objects of the shape; the color of, and the position ["left of", i] relative
#              to include i of, its `count` most salient ones) and "exclude" [{"shape", "count"}]
#              (fewer than count); None for full-scene captions, which GenEval has no rule for
#   describes  every object the prompt describes, as descs; full-scene captions name the cell too.
#              Descs of one prompt are equal or exclusive, so counting matches them one to one.
# The training image holds exactly the described objects; what the prompt leaves free (color,
# size, cell) is drawn at random, and no judge looks at it.

REL_T2I = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
POSITION_THRESHOLD = 0.1  # GenEval's: a centre offset is shrunk by this share of the boxes' sizes


def box(o, w):
    """An object's bounding box in the image, (x0, y0, x1, y1) with x1, y1 exclusive."""
    ys, xs = np.nonzero(templates(w)[o.shape, o.size])
    c = w.cell
    x0, y0 = o.col * c + xs.min(), o.row * c + ys.min()
    return x0, y0, o.col * c + xs.max() + 1, o.row * c + ys.max() + 1


def relations(a, b, w):
    """Where object a is relative to b, by GenEval's rule: on their boxes, the centre offset
    shrunk by POSITION_THRESHOLD x their summed sides, and a direction holds only where it makes
    up more than half of the offset's length, so it dominates ("left of" and "above" can both
    hold on a diagonal)."""
    ba, bb = np.array(box(a, w), float), np.array(box(b, w), float)
    offset = (ba[:2] + ba[2:]) / 2 - (bb[:2] + bb[2:]) / 2  # (dx, dy), y grows downwards
    dims = (ba[2:] - ba[:2]) + (bb[2:] - bb[:2])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {name for name, on in (("left of", dx < -0.5), ("right of", dx > 0.5),
                                  ("above", dy < -0.5), ("below", dy > 0.5)) if on}


def salient(objs):
    """Objects in the order a detector's confidence would list them: large ones first, then in
    reading order (GenEval judges a prompt's `count` most confident detections)."""
    return sorted(objs, key=lambda o: (o.size != "large", o.row, o.col))


def geneval_holds(geneval, objs, w):
    """GenEval's verdict: every include and exclude clause holds. Unreadable cells are no object
    of any shape, as a detector would not see one; GenEval never looks at anything else."""
    found = []  # per include: the objects it matched, or None
    right = True
    for req in geneval["include"]:
        top = salient([o for o in objs if o.shape == req["shape"]])[:req["count"]]
        ok = len(top) == req["count"]
        if ok and "color" in req:
            ok = sum(o.color == req["color"] for o in top) >= req["count"]
        if ok and "position" in req:
            rel, i = req["position"]
            ok = found[i] is not None and all(rel in relations(o, t, w)
                                              for o in top for t in found[i])
        found.append(top if ok else None)
        right &= ok
    return right and all(sum(o.shape == req["shape"] for o in objs) < req["count"]
                         for req in geneval["exclude"])


def holds_exactly(describes, scene):
    """The image holds the described objects and nothing else: no extra or unreadable object."""
    if scene.malformed or len(scene.objects) != len(describes):
        return False
    counts = {}
    for d in describes:
        key = tuple(sorted(d.items()))
        counts[key] = counts.get(key, 0) + 1
    return all(sum(matches(o, dict(k)) for o in scene.objects) == n for k, n in counts.items())


def t2i_family(rng, w, split, family):
    """(objects, text, geneval, describes) of one GenEval-category prompt."""
    shapes = rng.sample(w.shapes, 2)
    one = lambda d, **more: {"shape": d["shape"], "count": 1, **more}
    if family == "single_object":
        d = [{"shape": shapes[0]}]
        text, include, exclude = a_(shapes[0]), [one(d[0])], []
    elif family == "two_object":
        d = [{"shape": s} for s in shapes]
        text, include, exclude = f"{a_(shapes[0])} and {a_(shapes[1])}", [one(x) for x in d], []
    elif family == "counting":
        n = rng.randint(2, 4)
        d = [{"shape": shapes[0]}] * n
        text = f"{n} {plural(shapes[0])}"
        include = [{"shape": shapes[0], "count": n}]
        exclude = [{"shape": shapes[0], "count": n + 1}]
    elif family == "colors":
        d = [{"shape": shapes[0], "color": rng.choice(w.colors)}]
        text, include, exclude = a_(noun(d[0])), [one(d[0], color=d[0]["color"])], []
    elif family == "position":  # GenEval's order: the reference object, then the placed one
        d, rel = [{"shape": s} for s in shapes], REL_T2I[rng.choice(list(STEP))]
        text = f"{a_(shapes[0])} {rel} {a_(shapes[1])}"
        include, exclude = [one(d[1]), one(d[0], position=[rel, 0])], []
    else:  # color_attr
        colors = rng.sample(w.colors, 2)
        d = [{"shape": s, "color": c} for s, c in zip(shapes, colors)]
        text = f"{a_(noun(d[0]))} and {a_(noun(d[1]))}"
        include, exclude = [one(x, color=x["color"]) for x in d], []
    objs = place_all(rng, w, split, d)
    geneval = {"include": include, "exclude": exclude}
    if not geneval_holds(geneval, objs, w):  # a position GenEval would not call that
        raise Invalid
    return objs, text, geneval, d


def place_all(rng, w, split, descs):
    objs = []
    for d in descs:
        objs = place(rng, w, split, 1, d, objs)
    return objs


def gen_t2i(rng, w, split, family):
    if family == "scene":
        objs = rand_scene(rng, w, split)
        text = "; ".join(f"{a_(noun(o._asdict()))} in {cell_text(o[3:])}"
                         for o in Scene.of(objs).objects)
        geneval, describes = None, [o._asdict() for o in objs]
    else:
        objs, text, geneval, describes = _retry(lambda: t2i_family(rng, w, split, family))
    return dict(target_scene=objs, text=text[0].upper() + text[1:] + ".", geneval=geneval,
                describes=describes)


T2I_FAMILIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr",
                "scene")


# ----------------------------------------------------------------------------- edits
# An edit is a list of atoms, each resolved to cells of the source scene and applied in order:
#   {"op": "add", "cells": [[r, c], ..], "obj": [shape, color, size]}
#   {"op": "remove" | "recolor" | "reshape" | "resize", "cells": [..], "value": ..}
#   {"op": "move", "cells": [[r, c]], "to": [r, c]}     {"op": "swap", "cells": [[r, c], [r, c]]}

CHANGE = {"recolor": "color", "reshape": "shape", "resize": "size"}
IN_PLACE = ("recolor", "reshape", "resize", "remove")  # every action but a move


def apply_atoms(objs, atoms):
    cur = {(o.row, o.col): o for o in objs}
    for at in atoms:
        cells = [tuple(c) for c in at["cells"]]
        if at["op"] == "add":
            for r, c in cells:
                cur[r, c] = Obj(*at["obj"], r, c)
        elif at["op"] == "remove":
            for cell in cells:
                del cur[cell]
        elif at["op"] == "move":
            to = tuple(at["to"])
            cur[to] = cur.pop(cells[0])._replace(row=to[0], col=to[1])
        elif at["op"] == "swap":
            (ra, ca), (rb, cb) = cells
            a, b = cur[ra, ca], cur[rb, cb]
            cur[ra, ca], cur[rb, cb] = b._replace(row=ra, col=ca), a._replace(row=rb, col=cb)
        else:
            for cell in cells:
                cur[cell] = cur[cell]._replace(**{CHANGE[at["op"]]: at["value"]})
    return list(cur.values())


# A sample's edit: the atoms applied and, for intelligent edits, how they follow from the answer
# to the embedded question, so that `implied_target` can redo the edit for any other answer: a
# branch ("then" if the answer is "if_answer", else "else"), an attribute or a count the answer
# sets ("answer_sets"), or nothing (simple, location-referenced and quantified edits).


def branches(branch, if_answer, then, otherwise):
    return {"atoms": then if branch else otherwise, "branch": branch, "if_answer": if_answer,
            "then": then, "else": otherwise, "answer_sets": None}


def sets(what, atom):
    return {"atoms": [atom], "branch": None, "if_answer": None, "then": None, "else": None,
            "answer_sets": what}


def fixed(atoms):
    return {"atoms": atoms, "branch": None, "if_answer": None, "then": None, "else": None,
            "answer_sets": None}


def action(rng, w, objs, targets, ops=("recolor", "reshape", "resize", "remove", "move"), it=None):
    """A visible change to `targets`: (atom, verb phrase naming them `it`, else "it"/"them")."""
    many = len(targets) > 1 and it is None
    it = it or ("them" if many else "it")
    op = rng.choice([o for o in ops if o != "move" or not many])
    cells = [[t.row, t.col] for t in targets]
    if op == "remove":
        return {"op": op, "cells": cells}, f"remove {it}"
    if op == "move":
        to = rng.choice(empty_cells(w, objs))
        return {"op": op, "cells": cells, "to": list(to)}, f"move {it} to {cell_text(to)}"
    attr = CHANGE[op]
    new = [v for v in values(w, attr) if all(getattr(t, attr) != v for t in targets)]
    if not new:
        raise Invalid
    v = rng.choice(new)
    phrase = {"recolor": f"paint {it} {v}", "resize": f"make {it} {v}",
              "reshape": f"turn {it} into {plural(v) if many else a_(v)}"}[op]
    return {"op": op, "cells": cells, "value": v}, phrase


def simple_edit(rng, w, split, family):
    objs = rand_scene(rng, w, split, lo=2 if family == "swap" else 1,
                      hi=max_objects(w, split) - (family == "add"))
    if family == "add":
        cell = rng.choice(empty_cells(w, objs))
        o = rand_obj(rng, w, split, cell)
        return objs, [{"op": "add", "cells": [list(cell)], "obj": list(o[:3])}], \
            f"add {a_(noun(o._asdict()))} in {cell_text(cell)}"
    t = rng.choice(objs)
    ref = make_ref(rng, objs, t, 0)
    if family == "swap":
        t2 = rng.choice([o for o in objs if o[:3] != t[:3]] or [None])
        ref2 = t2 and make_ref(rng, objs, t2, 0)
        if not (ref and ref2):
            raise Invalid
        return objs, [{"op": "swap", "cells": [[t.row, t.col], [t2.row, t2.col]]}], \
            f"swap {ref_text(ref)} and {ref_text(ref2)}"
    if ref is None or (family == "move" and len(objs) == w.grid ** 2):
        raise Invalid
    atom, phrase = action(rng, w, objs, [t], ops=(family,), it=ref_text(ref))
    return objs, [atom], phrase


def gen_edit(rng, w, split, family):
    objs, atoms, text = _retry(lambda: simple_edit(rng, w, split, family))
    return dict(scene=objs, target_scene=apply_atoms(objs, atoms),
                text=text[0].upper() + text[1:] + ".", edit=fixed(atoms), level=0)


EDIT_FAMILIES = ("add", "remove", "recolor", "resize", "reshape", "move", "swap")


# ----------------------------------------------------------------------------- intelligent edits
# The Uni-Edit task: a VQA program is embedded in the instruction, so the edit is right only if
# the question is answered right. The answer never appears in the text except inside a
# condition ("If it is red, ..."). Each sample keeps the embedded question as its probe.
# Logic levels: L0 direct reference, L1 one question (attribute, count, relation or extreme),
# L2 two hops or a comparison with two branches, L3 several atoms under quantifiers.

P_TRUE = 0.6  # chance a condition holds; sets the no-op rate near 15% over the families
# Each family returns (objs, text, probe program, level, edit).

def condition(rng, w, attr, actual):
    """The value a condition tests for: the true answer with chance P_TRUE, else another one."""
    if rng.random() < P_TRUE:
        return actual, True
    return rng.choice([v for v in values(w, attr) if v != actual]) if attr else None, False


def ie_conditional(rng, w, split):
    hops = rng.choice((0, 1))
    q = rng.choice(ATTRS)
    objs = rand_scene(rng, w, split, lo=1 + hops)
    t = rng.choice(objs)
    ref = make_ref(rng, objs, t, hops, avoid=(q,))
    if ref is None:
        raise Invalid
    v, branch = condition(rng, w, q, getattr(t, q))
    atom, act = action(rng, w, objs, [t])
    text = f"identify the {q} of {ref_text(ref)}. If it is {a_(v) if q == 'shape' else v}, " \
           f"{act}; otherwise leave it unchanged"
    return objs, text, ["query", q, ref], 1 + hops, branches(branch, v, [atom], [])


def ie_synthesis(rng, w, split):
    hops = rng.choice((0, 1))
    q = rng.choice(ATTRS)
    objs = rand_scene(rng, w, split, lo=1 + hops, hi=max_objects(w, split) - 1)
    t = rng.choice(objs)
    ref = make_ref(rng, objs, t, hops, avoid=(q,))
    cell = rng.choice(empty_cells(w, objs))
    new = rand_obj(rng, w, split, cell, **{q: getattr(t, q)})
    if ref is None:
        raise Invalid
    named = noun({k: getattr(new, k) for k in ATTRS if k != q})  # "small cross", "red object"
    text = f"add {a_(named)} in {cell_text(cell)} with the same {q} as {ref_text(ref)}"
    atom = {"op": "add", "cells": [list(cell)], "obj": list(new[:3])}
    return objs, text, ["query", q, ref], 1 + hops, sets(q, atom)


def ie_count(rng, w, split):
    d = rand_desc(rng, w, rng.choice((1, 1, 2)))
    k = rng.randint(1, 3)
    objs = fill(rng, w, split, place(rng, w, split, k, d),
                rng.randint(0, max_objects(w, split) - k), [d])
    probe = ["count", ["all", d]]
    if rng.random() < 0.5:  # conditional: act on the counted objects if the count is right
        if rng.random() < P_TRUE:
            n, branch = k, True
        else:
            n, branch = rng.choice([x for x in range(1, 5) if x != k]), False
        atom, act = action(rng, w, objs, members(["all", d], objs), ops=IN_PLACE)
        text = f"count the {noun(d, many=True)}. If there are exactly {n}, {act}; otherwise " \
               f"leave the scene unchanged"
        return objs, text, probe, 1, branches(branch, str(n), [atom], [])
    free = empty_cells(w, objs)
    new = rand_obj(rng, w, split, (0, 0))
    if k > len(free) or len(objs) + k > max_objects(w, split):
        raise Invalid
    text = f"add as many {noun(new._asdict(), many=True)} as there are {noun(d, many=True)}, " \
           f"in the first empty cells in reading order"
    atom = {"op": "add", "cells": [list(c) for c in free[:k]], "obj": list(new[:3])}
    return objs, text, probe, 1, sets("count", atom)


def ie_location(rng, w, split):
    hops = rng.choice((0, 1, 1, 2))
    q = rng.choice(ATTRS)
    objs = rand_scene(rng, w, split, lo=1 + hops)
    if hops == 1 and rng.random() < 0.3:
        ref = ["most", rng.choice(list(MOST_KEY))]
        t = resolve(ref, objs)
    else:
        t = rng.choice(objs)
        ref = make_ref(rng, objs, t, hops, avoid=(q,))
    if ref is None:
        raise Invalid
    atom, act = action(rng, w, objs, [t])
    return objs, f"find {ref_text(ref)} and {act}", ["query", q, ref], hops, fixed([atom])


def quantified(rng, w, objs, s, what):
    """An action on every member of set `s`, phrased with `what` ("every circle")."""
    return action(rng, w, objs, members(s, objs), ops=IN_PLACE, it=what)


def ie_nested(rng, w, split):
    if rng.random() < 0.5:  # if/else over a comparison: both branches act
        dA, dB = two_descs(rng, w, same_attr=True)
        a, b = rng.randint(1, 2), rng.randint(1, 2)
        objs = place(rng, w, split, b, dB, place(rng, w, split, a, dA))
        objs = fill(rng, w, split, objs, rng.randint(0, 1), [dA, dB])
        A, B = ["all", dA], ["all", dB]
        atomA, actA = quantified(rng, w, objs, A, f"every {noun(dA)}")
        atomB, actB = quantified(rng, w, objs, B, f"every {noun(dB)}")
        text = f"if there are more {set_text(A)} than {set_text(B)}, {actA}; otherwise {actB}"
        return objs, text, ["compare", "more", A, B], 2, branches(a > b, "yes", [atomA], [atomB])
    # several atoms under a quantifier, composed in order; all references read the source scene
    d1, d2 = two_descs(rng, w, same_attr=rng.random() < 0.5)
    S = ["or", d1, d2]
    objs = place(rng, w, split, rng.randint(1, 2), rng.choice((d1, d2)))
    objs = fill(rng, w, split, objs, rng.randint(1, 3), [])
    hit = members(S, objs)
    atom1, act1 = quantified(rng, w, objs, S, f"every {set_text(S)[:-1]}")
    rest = [o for o in objs if o not in hit]
    if not rest:
        raise Invalid
    t = rng.choice(rest)
    ref = make_ref(rng, objs, t, 0)
    if ref is None:
        raise Invalid
    atom2, act2 = action(rng, w, objs, [t], ops=IN_PLACE, it=ref_text(ref))
    text = f"{act1}, then {act2}"
    return objs, text, ["count", S], 3, fixed([atom1, atom2])


IE_FAMILIES = {"conditional": ie_conditional, "synthesis": ie_synthesis,
               "count_conditioned": ie_count, "location": ie_location, "nested": ie_nested}


def gen_uniedit(rng, w, split, family):
    objs, text, probe, level, edit = _retry(lambda: IE_FAMILIES[family](rng, w, split))
    target = apply_atoms(objs, edit["atoms"])
    return dict(scene=objs, target_scene=target, text=text[0].upper() + text[1:] + ".", level=level,
                edit=edit,
                probe={"question": question_text(probe), "answer": answer(probe, objs),
                       "program": probe})


def implied_target(sample, said, world="default"):
    """The target scene an intelligent edit's instruction implies if its embedded question were
    answered `said` (say, by the model itself): None where the answer does not decide the edit
    (location and quantified edits act alike whatever it is) or cannot (it is no such value)."""
    e, w = sample["edit"], get_world(world)
    objs = [Obj(*o) for o in sample["scene"]]
    if e["if_answer"] is not None:  # "If it is red, ...; otherwise ...": the branch it picks
        atoms = e["then"] if said == e["if_answer"] else e["else"]
    elif e["answer_sets"] == "count":  # "add as many ... as there are ...": that many, in order
        free = empty_cells(w, objs)
        if not said.isdecimal() or int(said) > len(free):
            return None
        atoms = [{**e["atoms"][0], "cells": [list(c) for c in free[:int(said)]]}]
    elif e["answer_sets"] in ATTRS:  # "add ... with the same color as ...": that color
        if said not in values(w, e["answer_sets"]):
            return None
        obj = list(e["atoms"][0]["obj"])
        obj[ATTRS.index(e["answer_sets"])] = said
        atoms = [{**e["atoms"][0], "obj": obj}]
    else:
        return None
    return Scene.of(apply_atoms(objs, atoms)).to_json()


# ----------------------------------------------------------------------------- samples

GENERATORS = {"vqa": (gen_vqa, tuple(VQA_FAMILIES)), "t2i": (gen_t2i, T2I_FAMILIES),
              "edit": (gen_edit, EDIT_FAMILIES), "uniedit": (gen_uniedit, tuple(IE_FAMILIES))}
# A training stream of one family of a task, so that a mix can raise that family's share:
# train.py --mix=vqa:2,t2i:0.5,scene:0.5,edit:1 draws full-scene captions 4x as often as the
# default mix and keeps T2I's share of the batch. Its samples are ordinary samples of the task
# (their "task" is the task's), drawn under the stream's own seeds; datasets, the tokenizer and the
# eval sets never draw it.
FAMILY_STREAMS = {"scene": ("t2i", "scene")}
MIX_TASKS = TASKS + tuple(FAMILY_STREAMS)


def stream_task(name):
    """(task, family or None) that a mix entry draws: a task's every family, or a family stream's
    one."""
    return FAMILY_STREAMS.get(name, (name, None))


def sample_seed(*key):
    """A stable 64-bit seed from any key (Python's hash() of a str changes between runs)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")


def is_ood(s, w):
    """Does a sample show anything held out: a held-out (shape, color) or a scene too full?"""
    texts = [s["text"]] + ([s["probe"]["question"]] if s.get("probe") else [])
    if any(f"{c} {sh}" in t for sh, c in w.heldout for t in texts):
        return True
    scenes = [x for x in (s.get("scene"), s.get("target_scene")) if x is not None]
    return any(len(sc) > w.max_objects or any((o[0], o[1]) in w.heldout for o in sc)
               for sc in scenes)


def make_sample(world, task, split, index, seed=0):
    """Sample `index` of `task` (one of TASKS, or a FAMILY_STREAMS name) in `split`: a pure
    function of its arguments.

    Returns a dict with keys id, index, task, family, level, hops, split, text, answer,
    image (source, uint8 HxWx3, or None), target (image to produce, or None), scene,
    target_scene (lists of [shape, color, size, row, col]), geneval, describes, program, edit,
    probe.
    test_ood samples always show something held out; the other splits never do."""
    w = get_world(world)
    if task not in MIX_TASKS:
        raise ValueError(f"unknown task {task!r}: choose from {', '.join(MIX_TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    stream = task
    task, only = stream_task(stream)
    gen, families = GENERATORS[task]
    families = (only,) if only else families
    rng = random.Random(sample_seed(seed, w.name, stream, split, index))
    for _ in range(1000):
        family = rng.choice(families)
        try:
            s = gen(rng, w, split, family)
        except Invalid:
            continue
        if is_ood(s, w) == (split == "test_ood"):
            break
    else:
        raise RuntimeError(f"could not draw {task} sample {index} of {split}")
    scene = Scene.of(s["scene"]) if s.get("scene") is not None else None
    target = Scene.of(s["target_scene"]) if s.get("target_scene") is not None else None
    return {
        "id": f"{stream}/{split}/{index}", "index": index, "task": task, "family": family,
        "level": s.get("level"), "hops": s.get("hops"), "split": split, "text": s["text"],
        "answer": s.get("answer"),
        "image": render(scene, w) if scene else None,
        "target": render(target, w) if target else None,
        "scene": scene.to_json() if scene else None,
        "target_scene": target.to_json() if target else None,
        "geneval": s.get("geneval"), "describes": s.get("describes"), "program": s.get("program"),
        "edit": s.get("edit"), "probe": s.get("probe"),
    }


# ----------------------------------------------------------------------------- tokenizer

@lru_cache(maxsize=None)
def get_tokenizer(world="default", seed=0):
    """A BPE tokenizer trained on synthesized text of every task (deterministic for a seed).

    Metaspace pre-tokenization keeps spaces inside tokens, so decode(encode(t)) == t. Punctuation
    is split off first: otherwise BPE merges "1," "1;" "1." and "1" into four unrelated tokens, and
    the model must learn each cell coordinate (and each word ending a sentence) several times."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    w = get_world(world)
    texts = []
    for task in TASKS:
        for split in ("train", "test_ood"):
            for i in range(400):
                s = make_sample(w, task, split, i, seed)
                probe = s["probe"]["question"] if s["probe"] else ""
                texts += [s["text"], s["answer"] or "", probe]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(),
                                                 pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.Metaspace()
    alphabet = sorted(set("".join(texts)))
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=list(SPECIALS), initial_alphabet=alphabet,
        show_progress=False))
    return tok


# ----------------------------------------------------------------------------- datasets on disk
# A folder: meta.json, images.npy (uint8 N x H x W x 3, memory-mapped on read), samples.jsonl
# (one record per sample; images replaced by `image_idx` / `target_idx` rows of images.npy),
# tokenizer.json, contact.png. Sample i of a folder is make_sample(world, task_i, split_i, i, seed)
# with task_i = tasks[i % len(tasks)] and split_i from a seeded hash of i.

SPLIT_SHARES = (("train", 0.90), ("val", 0.04), ("test", 0.03), ("test_ood", 0.03))
PRESETS = {"uniedit-148k": dict(n=148_000, tasks=("uniedit",)),
           "uniedit-40k": dict(n=40_000, tasks=("uniedit",))}
FILES = ("meta.json", "images.npy", "samples.jsonl", "tokenizer.json", "contact.png")


def split_of(index, seed=0):
    u = sample_seed("split", seed, index) / 2 ** 64
    for name, share in SPLIT_SHARES:
        if u < share:
            return name
        u -= share
    return SPLIT_SHARES[-1][0]


def _images_per_sample(task):
    return {"vqa": 1, "t2i": 1, "edit": 2, "uniedit": 2}[task]


def _write_chunk(args):
    """Worker: make samples [lo, hi), write their images into the shared memmap, return records."""
    path, world, tasks, seed, lo, hi, offset = args
    images = np.load(path, mmap_mode="r+")
    records = []
    for i in range(lo, hi):
        s = make_sample(world, tasks[i % len(tasks)], split_of(i, seed), i, seed)
        rec = {k: v for k, v in s.items() if k not in ("image", "target")}
        rec["image_idx"] = rec["target_idx"] = None
        for key in ("image", "target"):
            if s[key] is not None:
                images[offset] = s[key]
                rec[key + "_idx"] = offset
                offset += 1
        records.append(json.dumps(rec, separators=(",", ":")))
    images.flush()
    return records


def check_tasks(tasks):
    if not tasks:
        raise ValueError(f"--tasks names no task: give some of {','.join(TASKS)}")
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}: choose from {', '.join(TASKS)}")


def check_writable(path, what="output"):
    """Fail now, in one line, if no file can be created at `path` (not after all the work)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ValueError(f"cannot write the {what} {path}: {e.strerror or e}") from None


def write_dataset(out, n, world="default", tasks=TASKS, seed=0, force=False, workers=None):
    """Write a dataset folder. Refuses a non-empty folder unless force; then only overwrites
    this format's own files, each written under a temporary name and renamed when complete."""
    w = get_world(world)
    check_tasks(tasks)
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"--n must be a positive integer, got {n!r}")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ValueError(f"output folder {out} exists and is not empty: pick another or pass "
                         f"--force")
    check_writable(os.path.join(out, "meta.json"), "dataset folder's file")
    from multiprocessing import get_context
    from tqdm import tqdm
    per = [_images_per_sample(tasks[i % len(tasks)]) for i in range(n)]
    offsets = np.concatenate([[0], np.cumsum(per)])
    tmp = os.path.join(out, "images.npy.tmp")
    shape = (int(offsets[-1]), w.size, w.size, 3)
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape).flush()
    step = 2000
    jobs = [(tmp, w.name, tuple(tasks), seed, lo, min(lo + step, n), int(offsets[lo]))
            for lo in range(0, n, step)]
    workers = workers or min(os.cpu_count() or 1, len(jobs))
    bar = tqdm(total=n, desc="synth", unit="sample")
    with open(os.path.join(out, "samples.jsonl.tmp"), "w") as f, bar:
        if workers == 1:
            chunks = map(_write_chunk, jobs)
        else:
            chunks = get_context("spawn").Pool(workers).imap(_write_chunk, jobs)
        for recs in chunks:
            f.write("\n".join(recs) + "\n")
            bar.update(len(recs))
    get_tokenizer(w.name, seed).save(os.path.join(out, "tokenizer.json.tmp"))
    meta = {"version": VERSION, "world": asdict(w), "seed": seed, "tasks": list(tasks), "n": n,
            "n_images": int(offsets[-1]), "split_shares": dict(SPLIT_SHARES)}
    with open(os.path.join(out, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=1)
    for name in FILES[:4]:
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    ds = Dataset(out)
    contact_sheet([ds[i] for i in range(min(n, 16))], os.path.join(out, "contact.png"))
    return out


class Dataset:
    """A dataset folder, memory-mapped: ds[i] is make_sample(world, task_i, split_i, i, seed)."""

    def __init__(self, path):
        self.path = path

        def bad(why):
            return ValueError(f"dataset {path} is corrupt or incomplete: {why}; rewrite it with "
                              f"python synth.py --out {path} --force")
        for name in FILES[:4]:
            if not os.path.isfile(os.path.join(path, name)):
                raise bad(f"{name} is missing")
        try:
            with open(os.path.join(path, "meta.json")) as f:
                self.meta = json.load(f)
        except (ValueError, OSError) as e:
            raise bad(str(e)) from None
        version = self.meta.get("version") if isinstance(self.meta, dict) else None
        if version != VERSION:  # checked before the world, whose fields change between versions
            raise bad(f"format version {version} but this synth.py reads {VERSION}")
        try:
            self.world = world_from_json(self.meta["world"])
            self.images = np.load(os.path.join(path, "images.npy"), mmap_mode="r")
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise bad(str(e)) from None
        if self.images.shape != (self.meta["n_images"], self.world.size, self.world.size, 3):
            raise bad(f"images.npy has shape {self.images.shape}, meta.json expects "
                      f"({self.meta['n_images']}, {self.world.size}, {self.world.size}, 3)")
        with open(os.path.join(path, "samples.jsonl"), "rb") as f:
            self._lines = f.read().split(b"\n")[:-1]
        if len(self._lines) != self.meta["n"]:
            raise bad(f"samples.jsonl has {len(self._lines)} records, meta.json says "
                      f"{self.meta['n']}")
        self.seed = self.meta["seed"]

    def __len__(self):
        return len(self._lines)

    def _record(self, i):
        try:
            return json.loads(self._lines[i])
        except json.JSONDecodeError as e:
            jsonl = os.path.join(self.path, "samples.jsonl")
            raise ValueError(f"{jsonl} line {i + 1} is not valid JSON ({e.msg}): rewrite the "
                             f"dataset with python synth.py --out {self.path} --force") from None

    def __getitem__(self, i):
        rec = self._record(i)
        for key in ("image", "target"):
            row = rec.pop(key + "_idx")
            rec[key] = None if row is None else np.array(self.images[row])
        return rec

    def records(self):
        """Every sample's record without its images (task, split, text, ...): cheap, for
        choosing samples."""
        return [self._record(i) for i in range(len(self._lines))]


# ----------------------------------------------------------------------------- contact sheet

def contact_sheet(samples, path, scale=3):
    """One row per sample: its text (and answer), source image, target image; for the eye."""
    font = ImageFont.load_default()
    first = samples[0]["image"] if samples[0]["image"] is not None else samples[0]["target"]
    side = first.shape[0]
    px = side * scale
    text_w, row_h = 520, px + 8
    sheet = Image.new("RGB", (text_w + 2 * px + 24, row_h * len(samples) + 8), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for k, s in enumerate(samples):
        y = 8 + k * row_h
        words, lines = f"[{s['id']} {s['family']}] {s['text']}".split(), [""]
        for word in words:  # wrap by character count: the default font is fixed-width enough
            fits = len(lines[-1]) + len(word) < 80
            lines[-1:] = [lines[-1] + " " + word] if fits else [lines[-1], word]
        if s["answer"]:
            lines.append(f"answer: {s['answer']}")
        if s["probe"]:
            lines.append(f"probe: {s['probe']['question']} {s['probe']['answer']}")
        text = "\n".join(x.strip() for x in lines)
        draw.multiline_text((6, y), text, fill=(230, 230, 230), font=font)
        for j, key in enumerate(("image", "target")):
            if s[key] is not None:
                im = Image.fromarray(np.asarray(s[key])).resize((px, px), Image.NEAREST)
                sheet.paste(im, (text_w + j * (px + 8), y))
    sheet.save(path)
    return path


# ----------------------------------------------------------------------------- CLI

def bench(world="default", tasks=("edit", "uniedit", "uniedit", "vqa", "t2i"), seconds=5.0):
    """On-the-fly synthesis speed on one core, edit-heavy mix by default: samples per second."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        make_sample(world, tasks[n % len(tasks)], "train", n)
        n += 1
    return n / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description="Synthesize nanoUMM datasets from the shapes world.")
    p.add_argument("--out", help="dataset folder to write")
    p.add_argument("--n", type=str, default=None,
                   help="number of samples (default 2000; 16 for --show)")
    p.add_argument("--world", default="default", help=f"one of {', '.join(WORLDS)}")
    p.add_argument("--tasks", default=",".join(TASKS),
                   help="comma-separated subset of " + ",".join(TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (sets --n and --tasks)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
    p.add_argument("--show", nargs="?", const="", metavar="DIR",
                   help="write a contact sheet of DIR's samples, or of on-the-fly samples "
                        "without DIR")
    p.add_argument("--png", help="where --show writes (default DIR/contact.png or ./contact.png)")
    p.add_argument("--split", default="train", help="split for on-the-fly --show")
    p.add_argument("--bench", action="store_true", help="print on-the-fly samples/s on one core")
    a = p.parse_args(argv)
    try:
        get_world(a.world)
        tasks = tuple(t for t in a.tasks.split(",") if t)
        if a.preset:
            if a.preset not in PRESETS:
                raise ValueError(f"unknown preset {a.preset!r}: choose one of {', '.join(PRESETS)}")
            tasks, a.n = PRESETS[a.preset]["tasks"], a.n or str(PRESETS[a.preset]["n"])
        check_tasks(tasks)
        n = a.n or ("16" if a.show is not None else "2000")
        if not n.isdigit() or int(n) <= 0:
            raise ValueError(f"--n must be a positive integer, got {n!r}")
        n = int(n)
        if a.bench:
            print(f"{bench(a.world):.0f} samples/s (world {a.world}, edit-heavy mix, one core)")
        elif a.show is not None:
            png = a.png or os.path.join(a.show or ".", "contact.png")
            check_writable(png, "contact sheet")
            if a.show:
                ds = Dataset(a.show)
                samples = [ds[i] for i in range(min(n, len(ds)))]
            else:
                samples = [make_sample(a.world, tasks[i % len(tasks)], a.split, i, a.seed)
                           for i in range(n)]
            print("wrote", contact_sheet(samples, png))
        elif a.out:
            t0 = time.time()
            write_dataset(a.out, n, a.world, tasks, a.seed, a.force)
            print(f"wrote {n} samples to {a.out} in {time.time() - t0:.1f}s (contact sheet: "
                  f"{a.out}/contact.png)")
        else:
            p.error("give --out DIR, --show [DIR] or --bench")
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

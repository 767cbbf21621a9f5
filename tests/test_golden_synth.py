"""Golden cases for the shapes world: python -m pytest tests/test_golden_synth.py -q

Every answer, target and verdict here is written by hand for a hand-made scene, so a wrong rule
in synth.py (a relation, a comparison, a count, an edit) fails even though the generator and the
checker would agree with each other. Where a rule has a symmetry (a relation and its converse,
the order of the object list, an edit and its undo) it is tested as a property on random scenes.
"""
import random
import re

import numpy as np
import pytest

import synth
from synth import Invalid, Obj

W = synth.get_world("tiny")

# Scene ONE, rows top to bottom, columns left to right (the text says row/column r + 1):
#   . A B . .      A red large circle (0,0)    B blue small square (0,1)
#   . . C . .      C green large triangle (1,1), directly below B
#   . . D . .      D red small square (2,1), directly below C
#   . . . . E      E yellow large circle (3,3)
A = Obj("circle", "red", "large", 0, 0)
B = Obj("square", "blue", "small", 0, 1)
C = Obj("triangle", "green", "large", 1, 1)
D = Obj("square", "red", "small", 2, 1)
E = Obj("circle", "yellow", "large", 3, 3)
ONE = [A, B, C, D, E]
# Scene TWO: F white small diamond (1,2), G orange large cross (2,0), H cyan large square (3,2):
# F is in H's column but two rows up (so not "directly above" it), and F and H tie for rightmost.
F = Obj("diamond", "white", "small", 1, 2)
G = Obj("cross", "orange", "large", 2, 0)
H = Obj("square", "cyan", "large", 3, 2)
TWO = [F, G, H]

the = lambda **desc: ["the", desc]

# (program, answer on ONE): one block per VQA family, each answer worked out by hand
GOLDEN_ONE = [
    # query color / shape / size
    (["query", "color", the(shape="triangle")], "green"),
    (["query", "shape", the(color="blue")], "square"),
    (["query", "size", the(color="yellow")], "large"),
    # exist
    (["exist", {"color": "red", "shape": "square"}], "yes"),
    (["exist", {"color": "red", "shape": "triangle"}], "no"),
    (["exist", {"size": "small", "color": "blue", "shape": "square"}], "yes"),
    # count
    (["count", ["all", {"color": "red"}]], "2"),
    (["count", ["all", {"shape": "diamond"}]], "0"),
    (["count", ["all", {"size": "large", "shape": "circle"}]], "2"),
    # 1-hop relations, each direction
    (["query", "color", ["rel", "right", the(color="red", shape="circle")]], "blue"),
    (["query", "color", ["rel", "left", the(color="blue")]], "red"),
    (["query", "shape", ["rel", "above", the(shape="triangle")]], "square"),
    (["query", "size", ["rel", "below", the(shape="triangle")]], "small"),
    (["query", "color", ["rel", "below", the(color="blue")]], "green"),
    # closest / farthest (squared grid distance)
    (["pos", "row", ["near", the(color="yellow")]], "3"),  # D at 5, C at 8, B at 13, A at 18
    (["query", "shape", ["near", the(color="red", shape="circle")]], "square"),  # B at 1
    (["query", "color", ["far", the(shape="triangle")]], "yellow"),  # E at 8
    # 2-hop relations
    (["query", "shape", ["rel", "below", ["near", the(color="red", shape="circle")]]], "triangle"),
    (["query", "color", ["rel", "above", ["rel", "above", the(color="red", size="small")]]],
     "blue"),
    # extremes
    (["query", "shape", ["most", "left"]], "circle"),
    (["query", "color", ["most", "right"]], "yellow"),
    (["query", "size", ["most", "bottom"]], "large"),
    # absolute position, 1-based words
    (["pos", "row", the(shape="triangle")], "2"),
    (["pos", "column", the(color="yellow")], "4"),
    (["pos", "column", the(color="red", shape="circle")], "1"),
    # same-attribute count: the other objects only
    (["same", "color", the(shape="circle", color="red")], "1"),
    (["same", "size", the(shape="triangle")], "2"),
    (["same", "shape", the(color="yellow")], "1"),
    (["same", "color", the(color="green")], "0"),
    # compare integers, including the ties
    (["compare", "more", ["all", {"color": "red"}], ["all", {"color": "blue"}]], "yes"),
    (["compare", "more", ["all", {"shape": "circle"}], ["all", {"shape": "square"}]], "no"),
    (["compare", "fewer", ["all", {"color": "blue"}], ["all", {"color": "red"}]], "yes"),
    (["compare", "fewer", ["all", {"shape": "circle"}], ["all", {"shape": "square"}]], "no"),
    (["compare", "equal", ["all", {"shape": "circle"}], ["all", {"shape": "square"}]], "yes"),
    (["compare", "equal", ["all", {"size": "small"}], ["all", {"size": "large"}]], "no"),
    # attribute equality
    (["equal", "color", the(color="red", shape="circle"), the(color="red", shape="square")], "yes"),
    (["equal", "size", the(color="blue"), the(shape="triangle")], "no"),
    (["equal", "shape", the(color="red", size="large"), the(color="yellow")], "yes"),
    # and / or counts
    (["count", ["or", {"color": "red"}, {"color": "blue"}]], "3"),
    (["count", ["and", {"color": "red"}, {"size": "small"}]], "1"),
    (["count", ["and", {"color": "red"}, {"size": "large"}]], "1"),
    (["count", ["or", {"size": "small"}, {"color": "yellow"}]], "3"),
]

GOLDEN_TWO = [
    (["query", "shape", ["most", "top"]], "diamond"),
    (["query", "color", ["most", "bottom"]], "cyan"),
    (["query", "shape", ["most", "left"]], "cross"),
    (["query", "shape", ["far", the(shape="diamond")]], "cross"),  # G at 5, H at 4
    (["query", "shape", ["near", the(shape="diamond")]], "square"),
]

# references that pick no object or two: an empty cell, not directly adjacent, or a tie
NOT_ONE = [
    (ONE, ["rel", "left", the(shape="triangle")]),  # (1, 0) is empty
    (ONE, ["near", the(shape="triangle")]),  # B and D both 1 away
    (ONE, ["most", "top"]),  # A and B share row 1
    (ONE, the(color="red")),  # two red objects
    (ONE, the(shape="cross")),  # none
    (TWO, ["rel", "above", the(color="cyan")]),  # F is in the same column, but two rows up
    (TWO, ["rel", "left", the(color="cyan")]),  # same row as nothing
    (TWO, ["near", the(shape="cross")]),  # F and H both 5 away
    (TWO, ["most", "right"]),  # F and H share column 3
]


@pytest.mark.parametrize("program, truth", GOLDEN_ONE + GOLDEN_TWO,
                         ids=[f"{p[0]}-{i}" for i, (p, _) in enumerate(GOLDEN_ONE + GOLDEN_TWO)])
def test_every_vqa_family_answers_hand_made_scenes_as_written_by_hand(program, truth):
    objs = ONE if (program, truth) in GOLDEN_ONE else TWO
    assert synth.answer(program, objs) == truth
    # and the same on the parse of the rendered image, as the eval's judge reads it
    assert synth.answer(program, synth.parse(synth.render(objs, W), W).objects) == truth


@pytest.mark.parametrize("objs, ref", NOT_ONE, ids=[str(r) for _, r in NOT_ONE])
def test_a_reference_to_no_object_or_to_a_tie_is_invalid(objs, ref):
    with pytest.raises(Invalid):
        synth.resolve(ref, objs)


def test_question_texts_read_as_written():
    cases = [
        (["compare", "fewer", ["all", {"color": "blue"}], ["all", {"color": "red"}]],
         "Are there fewer blue objects than red objects?"),
        (["compare", "more", ["all", {"shape": "cross"}], ["all", {"size": "small"}]],
         "Are there more crosses than small objects?"),
        (["compare", "equal", ["all", {"shape": "circle"}], ["all", {"shape": "square"}]],
         "Are there as many circles as squares?"),
        (["pos", "column", ["rel", "left", the(size="small", color="blue")]],
         "In which column is the object directly left of the small blue object?"),
        (["same", "shape", ["near", the(shape="cross")]],
         "How many other objects have the same shape as the object closest to the cross?"),
        (["count", ["and", {"color": "red"}, {"size": "small"}]],
         "How many objects that are both red and small are there?"),
        (["count", ["or", {"color": "red"}, {"color": "blue"}]],
         "How many red or blue objects are there?"),
        (["query", "color", ["most", "top"]], "What color is the topmost object?"),
        (["exist", {"size": "large", "color": "orange", "shape": "cross"}],
         "Is there a large orange cross?"),
        (["equal", "size", the(color="blue"), ["far", the(shape="triangle")]],
         "Do the blue object and the object farthest from the triangle have the same size?"),
        (["query", "shape", ["rel", "below", the(color="orange")]],
         "What shape is the object directly below the orange object?"),
    ]
    for program, text in cases:
        assert synth.question_text(program) == text


def random_scenes(n, seed=0):
    rng = random.Random(seed)
    return [synth.rand_scene(rng, W, "test_ood") for _ in range(n)]


def test_each_relation_holds_exactly_when_its_converse_does():
    converse = {"left": "right", "right": "left", "above": "below", "below": "above"}
    pairs = 0
    for objs in random_scenes(60):
        full = lambda o: ["the", dict(shape=o.shape, color=o.color, size=o.size)]
        unique = [o for o in objs if sum(o[:3] == x[:3] for x in objs) == 1]
        for a in unique:
            for b in unique:
                for rel, conv in converse.items():
                    try:
                        a_of_b = synth.resolve(["rel", rel, full(b)], objs) == a
                    except Invalid:
                        a_of_b = False
                    try:
                        b_of_a = synth.resolve(["rel", conv, full(a)], objs) == b
                    except Invalid:
                        b_of_a = False
                    assert a_of_b == b_of_a, (rel, a, b)
                    pairs += a_of_b
    assert pairs > 20  # the scenes hold enough neighbours for the property to mean something


def test_geneval_relations_are_converse_on_every_pair_of_cells():
    cells = [(r, c) for r in range(W.grid) for c in range(W.grid)]
    converse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for size_a in W.sizes:
        for (ra, ca) in cells:
            for (rb, cb) in cells:
                a = Obj("circle", "red", size_a, ra, ca)
                b = Obj("square", "blue", "large", rb, cb)
                ab, ba = synth.relations(a, b, W), synth.relations(b, a, W)
                assert {converse[x] for x in ab} == ba, (a, b, ab, ba)
                # a cell further left (by at least 2 columns, same row) is "left of" only
                if ra == rb and ca <= cb - 2:
                    assert ab == {"left of"}
                if ca == cb and ra <= rb - 2:
                    assert ab == {"above"}


def test_answers_do_not_depend_on_the_order_of_the_objects():
    rng = random.Random(1)
    for i in range(300):
        s = synth.make_sample(W, "vqa", "train", i)
        objs = [Obj(*o) for o in s["scene"]]
        rng.shuffle(objs)
        assert synth.answer(s["program"], objs) == s["answer"], s["text"]


# ----------------------------------------------------------------------------- edits

def scene(objs):
    return sorted(tuple(o) for o in objs)


GOLDEN_EDITS = [
    ({"op": "add", "cells": [[3, 0]], "obj": ["diamond", "white", "small"]},
     ONE + [Obj("diamond", "white", "small", 3, 0)]),
    ({"op": "remove", "cells": [[0, 1]]}, [A, C, D, E]),
    ({"op": "recolor", "cells": [[1, 1]], "value": "white"},
     [A, B, Obj("triangle", "white", "large", 1, 1), D, E]),
    ({"op": "resize", "cells": [[2, 1]], "value": "large"},
     [A, B, C, Obj("square", "red", "large", 2, 1), E]),
    ({"op": "reshape", "cells": [[3, 3], [0, 0]], "value": "diamond"},
     [Obj("diamond", "red", "large", 0, 0), B, C, D, Obj("diamond", "yellow", "large", 3, 3)]),
    ({"op": "move", "cells": [[0, 0]], "to": [2, 2]},
     [Obj("circle", "red", "large", 2, 2), B, C, D, E]),
    ({"op": "swap", "cells": [[0, 0], [3, 3]]},
     [Obj("circle", "yellow", "large", 0, 0), B, C, D, Obj("circle", "red", "large", 3, 3)]),
]


@pytest.mark.parametrize("atom, target", GOLDEN_EDITS, ids=[a["op"] for a, _ in GOLDEN_EDITS])
def test_each_edit_atom_gives_the_hand_written_target(atom, target):
    assert scene(synth.apply_atoms(ONE, [atom])) == scene(target)


def test_an_edit_followed_by_its_undo_gives_back_the_scene():
    undo = {
        "add": lambda a, objs: {"op": "remove", "cells": a["cells"]},
        "move": lambda a, objs: {"op": "move", "cells": [a["to"]], "to": a["cells"][0]},
        "swap": lambda a, objs: a,
        "recolor": lambda a, objs: {"op": "recolor", "cells": a["cells"],
                                    "value": cell(objs, a["cells"][0]).color},
        "resize": lambda a, objs: {"op": "resize", "cells": a["cells"],
                                   "value": cell(objs, a["cells"][0]).size},
        "reshape": lambda a, objs: {"op": "reshape", "cells": a["cells"],
                                    "value": cell(objs, a["cells"][0]).shape},
    }
    seen = set()
    for i in range(150):
        s = synth.make_sample(W, "edit", "train", i)
        (atom,) = s["edit"]["atoms"]
        if atom["op"] not in undo:
            continue
        seen.add(atom["op"])
        objs = [Obj(*o) for o in s["scene"]]
        edited = synth.apply_atoms(objs, [atom])
        assert scene(synth.apply_atoms(edited, [undo[atom["op"]](atom, objs)])) == scene(objs)
    assert seen == set(undo)


def cell(objs, rc):
    return next(o for o in objs if (o.row, o.col) == tuple(rc))


WORDS = {**{s: "shape" for s in W.shapes}, **{c: "color" for c in W.colors},
         **{z: "size" for z in W.sizes}}


def find(words, objs):
    """The one object a description like "small red circle" or "red object" names."""
    desc = {WORDS[w]: w for w in words.split() if w != "object"}
    hits = [o for o in objs if all(getattr(o, k) == v for k, v in desc.items())]
    assert len(hits) == 1, (words, objs)
    return hits[0]


def follow(text, objs):
    """A simple edit's instruction carried out by reading its words: an oracle that shares no code
    with synth's generator (which writes the text and the atoms from the same draw)."""
    objs = {(o.row, o.col): o for o in objs}
    t = text.rstrip(".")
    if m := re.fullmatch(r"Add an? (\w+) (\w+) (\w+) in row (\d), column (\d)", t):
        size, color, shape, r, c = m.groups()
        objs[int(r) - 1, int(c) - 1] = Obj(shape, color, size, int(r) - 1, int(c) - 1)
    elif m := re.fullmatch(r"Remove the (.+)", t):
        o = find(m[1], objs.values())
        del objs[o.row, o.col]
    elif m := re.fullmatch(r"Paint the (.+) (\w+)", t):
        o = find(m[1], objs.values())
        objs[o.row, o.col] = o._replace(color=m[2])
    elif m := re.fullmatch(r"Make the (.+) (small|large)", t):
        o = find(m[1], objs.values())
        objs[o.row, o.col] = o._replace(size=m[2])
    elif m := re.fullmatch(r"Turn the (.+) into an? (\w+)", t):
        o = find(m[1], objs.values())
        objs[o.row, o.col] = o._replace(shape=m[2])
    elif m := re.fullmatch(r"Move the (.+) to row (\d), column (\d)", t):
        o = find(m[1], objs.values())
        r, c = int(m[2]) - 1, int(m[3]) - 1
        assert (r, c) not in objs, text  # moves go to an empty cell
        del objs[o.row, o.col]
        objs[r, c] = o._replace(row=r, col=c)
    elif m := re.fullmatch(r"Swap the (.+) and the (.+)", t):
        a, b = find(m[1], objs.values()), find(m[2], objs.values())
        objs[a.row, a.col] = b._replace(row=a.row, col=a.col)
        objs[b.row, b.col] = a._replace(row=b.row, col=b.col)
    else:
        raise AssertionError(f"an instruction no simple edit writes: {text!r}")
    return list(objs.values())


def test_simple_edit_targets_are_what_the_instruction_words_say():
    fams = set()
    for i in range(210):
        s = synth.make_sample(W, "edit", "train", i)
        fams.add(s["family"])
        objs = [Obj(*o) for o in s["scene"]]
        target = scene(Obj(*o) for o in s["target_scene"])
        assert scene(follow(s["text"], objs)) == target, s["text"]
    assert fams == set(synth.EDIT_FAMILIES)


def test_count_edits_fill_the_first_empty_cells_in_reading_order():
    # ONE's empty cells in reading order: row 1 columns 3 and 4, then row 2 column 1, ...
    assert synth.empty_cells(W, ONE)[:4] == [(0, 2), (0, 3), (1, 0), (1, 2)]
    count_add = {"scene": [list(o) for o in ONE],
                 "edit": {"atoms": [{"op": "add", "cells": [[0, 2]], "obj": ["cross", "white",
                                                                            "small"]}],
                          "branch": None, "if_answer": None, "then": None, "else": None,
                          "answer_sets": "count"}}
    cross = lambda r, c: Obj("cross", "white", "small", r, c)
    for said, added in (("0", []), ("1", [cross(0, 2)]), ("3", [cross(0, 2), cross(0, 3),
                                                                 cross(1, 0)])):
        implied = synth.implied_target(count_add, said, W)
        assert scene(Obj(*o) for o in implied) == scene(ONE + added)
    assert synth.implied_target(count_add, "red", W) is None
    # the generator's own count edits agree: k added objects in the first k empty cells
    checked = 0
    for i in range(400):
        s = synth.make_sample(W, "uniedit", "train", i)
        if s["edit"]["answer_sets"] != "count":
            continue
        src = {tuple(o[3:]) for o in s["scene"]}
        added = sorted(tuple(o[3:]) for o in s["target_scene"] if tuple(o[3:]) not in src)
        free = [(r, c) for r in range(W.grid) for c in range(W.grid) if (r, c) not in src]
        assert added == free[:int(s["probe"]["answer"])], s["text"]
        checked += 1
    assert checked >= 5


def test_a_conditional_edit_takes_the_branch_its_answer_picks():
    paint = {"op": "recolor", "cells": [[1, 1]], "value": "white"}
    sample = {"scene": [list(o) for o in ONE],
              "edit": {"atoms": [paint], "branch": True, "if_answer": "green", "then": [paint],
                       "else": [], "answer_sets": None}}
    white = scene([A, B, C._replace(color="white"), D, E])
    assert scene(Obj(*o) for o in synth.implied_target(sample, "green", W)) == white
    assert scene(Obj(*o) for o in synth.implied_target(sample, "red", W)) == scene(ONE)


# ----------------------------------------------------------------------------- T2I clauses

def include(shape, count=1, **more):
    return {"shape": shape, "count": count, **more}


def holds(geneval, objs):
    return synth.geneval_holds(geneval, objs, W)


def test_every_geneval_clause_kind_on_hand_made_scenes():
    o = lambda shape, color, size, r, c: Obj(shape, color, size, r, c)
    single = {"include": [include("circle")], "exclude": []}
    assert holds(single, [o("circle", "blue", "small", 2, 2)])
    assert not holds(single, [o("square", "blue", "small", 2, 2)])
    two = {"include": [include("circle"), include("square")], "exclude": []}
    assert holds(two, [o("circle", "red", "large", 0, 0), o("square", "red", "small", 3, 3)])
    assert not holds(two, [o("circle", "red", "large", 0, 0), o("circle", "red", "small", 3, 3)])
    counting = {"include": [include("circle", 3)], "exclude": [include("circle", 4)]}
    circles = [o("circle", "red", "large", 0, c) for c in range(4)]
    assert holds(counting, circles[:3])
    assert not holds(counting, circles[:2])  # too few
    assert not holds(counting, circles)  # too many: the exclude clause
    colors = {"include": [include("circle", color="red")], "exclude": []}
    assert holds(colors, [o("circle", "red", "large", 1, 1)])
    # the most salient circle (the large one) is blue, though a small red one is there too
    assert not holds(colors, [o("circle", "red", "small", 0, 0),
                              o("circle", "blue", "large", 3, 3)])
    position = {"include": [include("square"), include("circle", position=["left of", 0])],
                "exclude": []}
    assert holds(position, [o("circle", "red", "large", 1, 0), o("square", "red", "large", 1, 2)])
    assert not holds(position, [o("circle", "red", "large", 1, 2),
                                o("square", "red", "large", 1, 0)])
    # one column left but two rows up: "above" dominates the offset, so not "left of"
    assert not holds(position, [o("circle", "red", "large", 0, 0),
                                o("square", "red", "large", 2, 1)])
    assert not holds(position, [o("circle", "red", "large", 1, 0)])  # no square to be left of
    attr = {"include": [include("circle", color="red"), include("square", color="blue")],
            "exclude": []}
    assert holds(attr, [o("circle", "red", "large", 0, 0), o("square", "blue", "small", 2, 2)])
    assert not holds(attr, [o("circle", "blue", "large", 0, 0), o("square", "red", "small", 2, 2)])


def test_strict_holds_exactly_the_described_objects():
    describes = [{"shape": "circle"}, {"shape": "square", "color": "blue"}]
    right = [Obj("circle", "red", "large", 0, 0), Obj("square", "blue", "small", 1, 1)]
    exactly = lambda objs, bad=(): synth.holds_exactly(describes, synth.Scene(tuple(objs), bad))
    assert exactly(right)
    assert not exactly(right + [Obj("diamond", "red", "small", 3, 3)])  # an extra object
    assert not exactly(right[:1])  # a missing one
    assert not exactly(right, bad=((3, 3),))  # an unreadable blob
    assert not exactly([right[0], Obj("square", "red", "small", 1, 1)])  # the wrong color
    assert not exactly([right[0], Obj("circle", "blue", "small", 1, 1)])  # two circles, no square


# ----------------------------------------------------------------------------- splits

def test_held_out_combinations_and_counts_mark_a_sample_ood():
    five = [Obj(s, "blue", "small", 0, c) for c, s in enumerate(W.shapes)]
    plain = {"text": "A blue circle.", "scene": [list(o) for o in five], "target_scene": None,
             "probe": None}
    assert not synth.is_ood(plain, W)  # the largest training count is not OOD
    six = five + [Obj("circle", "blue", "small", 1, 0)]
    assert synth.is_ood({**plain, "scene": [list(o) for o in six]}, W)
    assert synth.is_ood({**plain, "target_scene": [list(o) for o in six]}, W)
    red_triangle = [["triangle", "red", "large", 2, 2]]
    assert synth.is_ood({**plain, "scene": red_triangle}, W)
    assert synth.is_ood({**plain, "text": "Add a red triangle in row 1, column 1."}, W)
    probe = {"question": "Is there a cyan circle?", "answer": "no", "program": None}
    assert synth.is_ood({**plain, "probe": probe}, W)


def test_dataset_splits_take_their_documented_shares():
    n = 20_000
    splits = [synth.split_of(i) for i in range(n)]
    got = np.array([splits.count(name) for name in synth.SPLITS]) / n
    want = np.array([dict(synth.SPLIT_SHARES)[name] for name in synth.SPLITS])
    assert np.abs(got - want).max() < 0.007, dict(zip(synth.SPLITS, got))

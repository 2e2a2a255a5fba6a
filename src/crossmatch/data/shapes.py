"""Synthetic captioned shapes: a small, hard image-text retrieval dataset rendered with PIL.

Each image holds 1-3 objects (shape, colour, size, position) on a varied background and comes with 5
differently-worded captions that name every object and state spatial relations ("left of", "above") that
are true in the picture, plus each object's bounding box. The scenes follow the idea of CLEVR (Johnson et
al., CVPR 2017) at retrieval scale. Val and test include *twins*: pairs of scenes with the same objects but
swapped colours, sizes or positions, so a bag-of-words model cannot separate them (the probe of Winoground,
Thrush et al., CVPR 2022, and ARO, Yuksekgonul et al., ICLR 2023).

The output is ``images/*.png`` plus a Karpathy-split ``dataset.json`` (the Flickr30K/COCO format), so the
loader that reads real data reads this too. The generator knows every scene, so each sentence also carries
exact compositional negatives (``"negatives": [{"raw", "type"}]``: attributes swapped between two objects, the
two sides of a relation swapped, a relation word flipped, one attribute replaced; NegCLIP and SugarCrepe,
Yuksekgonul et al. 2023, Hsieh et al. 2023), each checked to be false of its scene, and the test split's
(image, caption, negative) triples go to ``test_negatives.jsonl`` (what ``crossmatch evaluate --negatives``
reads). Every image is a function of ``(seed, split, index)``: val/test
scenes are planned in order in the parent process, where de-duplication needs a global view; train scenes,
all captions and all pixels come from per-image RNGs in a process pool, so the worker count changes nothing.
"""

import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from crossmatch.data.negatives import FLIP_RELATION, REPLACE_ATTRIBUTE, SWAP_ATTRIBUTES, SWAP_RELATION
from crossmatch.data.negatives import TYPES as NEGATIVE_TYPES
from crossmatch.errors import ConfigError
from crossmatch.files import write_text

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SUPERSAMPLE = 4  # draw object masks at 4x, then LANCZOS down: anti-aliased edges without a rasteriser
REL_MARGIN = 0.125  # a relation is stated only if box centres differ by this fraction of the image side
MAX_OVERLAP = 0.1  # at most this fraction of the smaller box may be covered by another object's box
SIZE_RANGE = {"small": (12.0, 16.0), "large": (22.0, 28.0)}  # box side in px at 64 px, scaled with size
MAX_TRIES = 10_000

# The first word of each list is the canonical name stored in the JSON; the rest are caption synonyms.
# Every word is a single token so that captions can be parsed back in tests.
SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "pyramid"),
    "diamond": ("diamond", "rhombus"),
    "star": ("star",),
    "hexagon": ("hexagon",),
    "cross": ("cross", "plus"),
}
# Saturated, clearly distinct object colours; backgrounds below are muted mid-tones far from all of them.
COLORS = {
    "red": ((220, 30, 30), ("red", "crimson", "scarlet")),
    "green": ((30, 160, 60), ("green", "emerald")),
    "blue": ((30, 70, 220), ("blue", "cobalt")),
    "yellow": ((245, 215, 20), ("yellow", "golden")),
    "purple": ((135, 40, 180), ("purple", "violet")),
    "orange": ((250, 130, 10), ("orange", "tangerine")),
    "white": ((250, 250, 250), ("white", "snowy")),
    "black": ((15, 15, 15), ("black", "ebony")),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
REL_WORDS = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath", "lower than"),
}
BACKGROUNDS = ((128, 128, 128), (190, 176, 150), (92, 104, 118), (140, 158, 128), (176, 146, 152), (150, 168, 188))

# Caption templates. {x} is "a small red circle", {xr} "the red circle", {r}/{s} relation phrases.
ONE = ("{x}", "there is {x}", "a picture of {x}", "an image showing {x}", "just {x} on its own", "{x} in the picture")
TWO = ("{x} {r} {y}", "there is {x} {r} {y}", "{x} is {r} {y}", "{x} sits {r} {y}", "a picture of {x} {r} {y}",
       "{x} and {y}, {xr} is {r} {yr}")  # fmt: skip
THREE = (  # two relations chain all three objects
    "{x} {r} {y} and {z} {s} {wr}",
    "there is {x} {r} {y}, and {z} is {s} {wr}",
    "{x}, {y} and {z}: {xr} is {r} {yr} and {zr} is {s} {wr}",
    "an image where {x} is {r} {y} and {z} is {s} {wr}",
)
THREE_ONE_REL = ("{x} {r} {y}, as well as {z}", "{x} {r} {y} and also {z}", "{z}, and {x} {r} {y}")


def _normalise(pts: list[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Centre a polygon on its bounding box and scale its longer side to [-1, 1]."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    half = max(max(xs) - min(xs), max(ys) - min(ys)) / 2
    return tuple(((x - cx) / half, (y - cy) / half) for x, y in pts)


def _regular(n: int, start_deg: float, inner: float | None = None) -> tuple[tuple[float, float], ...]:
    """A regular n-gon, or an n-pointed star when ``inner`` (the inner radius) is given."""
    k = 2 * n if inner else n
    radii = [inner if inner and i % 2 else 1.0 for i in range(k)]
    angles = [math.radians(start_deg + 360 * i / k) for i in range(k)]
    return _normalise([(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles, strict=True)])


_T = 0.34  # half-width of a cross arm
UNIT_SHAPES: dict[str, tuple[tuple[float, float], ...] | None] = {
    "circle": None,  # drawn with ellipse()
    "square": ((-1, -1), (1, -1), (1, 1), (-1, 1)),
    "triangle": ((0, -1), (1, 1), (-1, 1)),
    "diamond": ((0, -1), (1, 0), (0, 1), (-1, 0)),
    "star": _regular(5, -90, inner=0.45),
    "hexagon": _regular(6, 0),
    "cross": (
        (-_T, -1),
        (_T, -1),
        (_T, -_T),
        (1, -_T),
        (1, _T),
        (_T, _T),
        (_T, 1),
        (-_T, 1),
        (-_T, _T),
        (-1, _T),
        (-1, -_T),
        (-_T, -_T),
    ),  # fmt: skip
}
# Tight extent (x0, y0, x1, y1) of each unit shape, so recorded boxes hug the drawn pixels.
_EXTENT = {k: (-1.0, -1.0, 1.0, 1.0) if v is None else (min(x for x, _ in v), min(y for _, y in v),
                                                        max(x for x, _ in v), max(y for _, y in v))
           for k, v in UNIT_SHAPES.items()}  # fmt: skip

Obj = dict[str, Any]  # shape, color, size (names); d (box side), cx, cy (centre), box (x0, y0, x1, y1) in px
SHAPES, COLOR_NAMES = tuple(SHAPE_WORDS), tuple(COLORS)


def _box(o: Obj) -> list[float]:
    """Tight box [x0, y0, x1, y1] in output pixels; rounded so that JSON readers see the same geometry."""
    x0, y0, x1, y1 = _EXTENT[o["shape"]]
    r = o["d"] / 2
    cx, cy = o["cx"], o["cy"]
    return [round(cx + r * x0, 2), round(cy + r * y0, 2), round(cx + r * x1, 2), round(cy + r * y1, 2)]


def relations(box_a: list[float], box_b: list[float], size: int) -> tuple[str, ...]:
    """Clear spatial relations of object a to object b: at most one of left/right, then one of above/below."""
    margin = REL_MARGIN * size
    dx = (box_a[0] + box_a[2] - box_b[0] - box_b[2]) / 2  # centre of a minus centre of b
    dy = (box_a[1] + box_a[3] - box_b[1] - box_b[3]) / 2  # image y grows downwards
    horizontal = ("left",) if dx < -margin else ("right",) if dx > margin else ()
    return horizontal + (("above",) if dy < -margin else ("below",) if dy > margin else ())


def describe(o: dict[str, str]) -> str:
    """Canonical description of one object, e.g. "small red circle"."""
    return f"{o['size']} {o['color']} {o['shape']}"


def scene_facts(objects: list[dict], boxes: list[list[float]], size: int) -> frozenset[tuple[str, str, str]]:
    """Every true (object, relation, object) statement of a scene, objects given by their description."""
    described = [(describe(o), box) for o, box in zip(objects, boxes, strict=True)]
    pairs = itertools.permutations(described, 2)
    return frozenset((da, rel, db) for (da, ba), (db, bb) in pairs for rel in relations(ba, bb, size))


def scene_key(objects: list[dict], boxes: list[list[float]], size: int) -> str:
    """Canonical scene description (objects and all their relations), to de-duplicate; reads JSON entries too."""
    facts = sorted(" ".join(f) for f in scene_facts(objects, boxes, size))
    return "|".join(sorted(describe(o) for o in objects)) + "#" + ";".join(facts)


def _valid(objs: list[Obj], size: int) -> bool:
    """Inside the image, little overlap, and every pair of objects in a clear relation."""
    boxes = [o["box"] for o in objs]
    if any(b[0] < 0 or b[1] < 0 or b[2] > size or b[3] > size for b in boxes):
        return False
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
            if inter > MAX_OVERLAP * smaller or not relations(a, b, size):
                return False
    return True


def _sample_scene(rng: random.Random, size: int, n: int) -> list[Obj] | None:
    """n objects with distinct (shape, colour), so "the red circle" always names one object; None if unplaceable."""
    objs: list[Obj] = []
    while len(objs) < n:
        o = {"shape": rng.choice(SHAPES), "color": rng.choice(COLOR_NAMES), "size": rng.choice(("small", "large"))}
        if all((o["shape"], o["color"]) != (p["shape"], p["color"]) for p in objs):
            o["d"] = round(rng.uniform(*SIZE_RANGE[o["size"]]) * size / 64, 2)
            objs.append(o)
    for _ in range(50):  # rejection-sample positions
        for o in objs:
            lo, hi = o["d"] / 2 + 0.5, size - o["d"] / 2 - 0.5
            o["cx"], o["cy"] = round(rng.uniform(lo, hi), 2), round(rng.uniform(lo, hi), 2)
            o["box"] = _box(o)
        if _valid(objs, size):
            return objs
    return None


def _twin(rng: random.Random, objs: list[Obj], size: int) -> list[Obj] | None:
    """Same objects with two of them swapping colour, size or position; None if the result is invalid."""
    b = [dict(o) for o in objs]
    i, j = rng.sample(range(len(b)), 2)
    keys = rng.choice((("color",), ("color",), ("size", "d"), ("cx", "cy")))  # colour swaps: the classic case
    for k in keys:
        b[i][k], b[j][k] = b[j][k], b[i][k]
    for o in b:
        o["box"] = _box(o)
    if len({(o["shape"], o["color"]) for o in b}) < len(b) or not _valid(b, size):
        return None
    return b


def _key(objs: list[Obj], size: int) -> str:
    return scene_key(objs, [o["box"] for o in objs], size)


def _rel_phrase(rng: random.Random, rels: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """A wording of one (or, when both hold, both) relations, and the relations it states."""
    if len(rels) == 2 and rng.random() < 0.3:
        return _compound(rels), rels  # "above and to the left of"
    rel = rng.choice(rels)
    return rng.choice(REL_WORDS[rel]), (rel,)


def _compound(rels: tuple[str, ...]) -> str:
    """(horizontal, vertical) -> "above and to the left of"."""
    return f"{rels[1]} and to the {rels[0]} of"


@dataclass
class Wording:
    """The structure of one caption, so that it can be re-rendered with one thing changed (exact negatives).

    Attributes:
        template: one of ONE, TWO, THREE, THREE_ONE_REL.
        words: per object of the scene, its [size word, colour word, shape word] (synonyms as written).
        roles: template slot -> object index: x, y (first relation), z, w (second relation, or z alone).
        phrases: "r" (x to y) and "s" (z to w) -> (relation phrase, the relations it states).
    """

    template: str
    words: list[list[str]]
    roles: dict[str, int]
    phrases: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)

    def render(self) -> str:
        full = [f"a {s} {c} {sh}" for s, c, sh in self.words]  # first mention: size, colour, shape
        ref = [f"the {c} {sh}" for _, c, sh in self.words]  # later mentions: unique because (shape, colour) is
        fields = {k: full[i] for k, i in self.roles.items()} | {f"{k}r": ref[i] for k, i in self.roles.items()}
        return self.template.format(**fields, **{k: phrase for k, (phrase, _) in self.phrases.items()})

    def described(self) -> list[str]:
        """Canonical description of every object the caption names (sorted), e.g. ["small red circle"]."""
        return sorted(f"{SIZE_OF[s]} {COLOR_OF[c]} {SHAPE_OF[sh]}" for s, c, sh in self.words)

    def stated(self) -> frozenset[tuple[str, str, str]]:
        """The (object, relation, object) facts the caption states, objects by canonical description."""
        name = [f"{SIZE_OF[s]} {COLOR_OF[c]} {SHAPE_OF[sh]}" for s, c, sh in self.words]
        pairs = {"r": ("x", "y"), "s": ("z", "w")}
        return frozenset(
            (name[self.roles[a]], rel, name[self.roles[b]])
            for slot, (_, rels) in self.phrases.items()
            for a, b in [pairs[slot]]
            for rel in rels
        )

    def true_of(self, objs: list[dict], boxes: list[list[float]], size: int) -> bool:
        """The caption names exactly the scene's objects and every relation it states holds."""
        same_objects = self.described() == sorted(describe(o) for o in objs)
        return same_objects and self.stated() <= scene_facts(objs, boxes, size)


SHAPE_OF = {w: k for k, words in SHAPE_WORDS.items() for w in words}  # synonym -> canonical name
COLOR_OF = {w: k for k, (_, words) in COLORS.items() for w in words}
SIZE_OF = {w: k for k, words in SIZE_WORDS.items() for w in words}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
FLIP_PHRASE = {  # each relation phrase of REL_WORDS -> its opposite, worded alike
    **{a: b for a, b in zip(REL_WORDS["left"], REL_WORDS["right"], strict=True)},
    **{b: a for a, b in zip(REL_WORDS["left"], REL_WORDS["right"], strict=True)},
    "above": "below", "below": "above", "over": "under", "under": "over", "beneath": "above",
    "higher than": "lower than", "lower than": "higher than",
}  # fmt: skip


def _wording(rng: random.Random, objs: list[Obj], size: int) -> Wording:
    """One caption naming every object (its structure; `Wording.render` gives the text)."""
    words = [[rng.choice(SIZE_WORDS[o["size"]]), rng.choice(COLORS[o["color"]][1]), rng.choice(SHAPE_WORDS[o["shape"]])]
             for o in objs]  # fmt: skip
    if len(objs) == 1:
        return Wording(rng.choice(ONE), words, {"x": 0})
    x, y, *rest = rng.sample(range(len(objs)), len(objs))
    r = _rel_phrase(rng, relations(objs[x]["box"], objs[y]["box"], size))  # _valid(): every pair related
    if not rest:
        return Wording(rng.choice(TWO), words, {"x": x, "y": y}, {"r": r})
    z = rest[0]
    if rng.random() < 0.25:
        return Wording(rng.choice(THREE_ONE_REL), words, {"x": x, "y": y, "z": z}, {"r": r})
    w = rng.choice((x, y))
    s = _rel_phrase(rng, relations(objs[z]["box"], objs[w]["box"], size))
    return Wording(rng.choice(THREE), words, {"x": x, "y": y, "z": z, "w": w}, {"r": r, "s": s})


def _flipped(phrase: str, rels: tuple[str, ...], k: int) -> tuple[str, tuple[str, ...]]:
    """The phrase with its k-th stated relation turned into the opposite one."""
    new = tuple(OPPOSITE[r] if j == k else r for j, r in enumerate(rels))
    return (_compound(new) if len(rels) == 2 else FLIP_PHRASE[phrase]), new


def _candidates(wording: Wording, objs: list[Obj], rng: random.Random) -> dict[str, list[Wording]]:
    """Every perturbed wording of each type (not yet checked against the scene)."""
    out: dict[str, list[Wording]] = {t: [] for t in NEGATIVE_TYPES}
    used = sorted(set(wording.roles.values()))
    for a, b in itertools.combinations(used, 2):
        for kind in (1, 0):  # colour, then size
            words = [list(w) for w in wording.words]
            words[a][kind], words[b][kind] = words[b][kind], words[a][kind]
            out[SWAP_ATTRIBUTES].append(dataclasses.replace(wording, words=words))
    if "r" in wording.phrases:
        roles = dict(wording.roles, x=wording.roles["y"], y=wording.roles["x"])
        out[SWAP_RELATION].append(dataclasses.replace(wording, roles=roles))
    for slot, (phrase, rels) in wording.phrases.items():
        for k in range(len(rels)):
            phrases = {**wording.phrases, slot: _flipped(phrase, rels, k)}
            out[FLIP_RELATION].append(dataclasses.replace(wording, phrases=phrases))
    taken = {(o["shape"], o["color"]) for o in objs}
    for i in used:
        o = objs[i]
        for kind, values in ((1, COLOR_NAMES), (0, tuple(SIZE_WORDS))):
            for value in values:
                current = o["color"] if kind == 1 else o["size"]
                if value == current or (kind == 1 and (o["shape"], value) in taken):  # "the red circle" stays unique
                    continue
                words = [list(w) for w in wording.words]
                synonyms = COLORS[value][1] if kind == 1 else SIZE_WORDS[value]
                words[i][kind] = rng.choice(synonyms)
                out[REPLACE_ATTRIBUTE].append(dataclasses.replace(wording, words=words))
    return out


def exact_negatives(wording: Wording, objs: list[Obj], size: int, rng: random.Random) -> list[dict[str, str]]:
    """At most one negative of each type for a caption: {"raw": text, "type": one of NEGATIVE_TYPES}.

    Each is checked against the scene: it differs from the caption, from the other negatives, and is false of
    the scene (names other objects than the scene holds, or states a relation that does not hold)."""
    caption, boxes = wording.render(), [o["box"] for o in objs]
    out, seen = [], {caption}
    for kind, options in _candidates(wording, objs, rng).items():
        valid = [w for w in options if w.render() not in seen and not w.true_of(objs, boxes, size)]
        if valid:
            raw = rng.choice(valid).render()
            seen.add(raw)
            out.append({"raw": raw, "type": kind})
    return out


def _captions(rng: random.Random, objs: list[Obj], size: int, twin: list[Obj] | None, n: int = 5) -> list[Wording]:
    """n distinct captions; with a twin, none of them may also be true of the twin (else retrieval is ambiguous)."""
    own_objs = sorted(describe(o) for o in objs)
    same_objs = twin is not None and own_objs == sorted(describe(o) for o in twin)
    twin_facts = scene_facts(twin, [o["box"] for o in twin], size) if same_objs else frozenset()
    out: list[Wording] = []
    for _ in range(MAX_TRIES):
        wording = _wording(rng, objs, size)
        raw, stated = wording.render(), wording.stated()
        if raw not in {w.render() for w in out} and not (same_objs and stated <= twin_facts):
            out.append(wording)
            if len(out) == n:
                return out
    raise RuntimeError(f"could not word {n} distinct captions for {own_objs}")


def _sample_slot(split: str, p: int, pair: bool, seed: int, size: int, taken: set[str]) -> list[list[Obj]]:
    """The scene at position p of a split, or the twin pair at p, p+1; its scene keys must not be in ``taken``."""
    rng = random.Random(f"shapes/{seed}/{split}/{p}")  # str seeds are hashed with sha512: stable everywhere
    n_obj_weights = (0.15, 0.4, 0.45) if split == "train" else (0.05, 0.45, 0.5)  # eval takes few 1-object keys
    for _ in range(MAX_TRIES):
        if pair:
            a = _sample_scene(rng, size, rng.choice((2, 3)))
            b = _twin(rng, a, size) if a else None
            if a and b and (ka := _key(a, size)) != (kb := _key(b, size)) and ka not in taken and kb not in taken:
                if _captionable(split, p, seed, size, [a, b]):
                    return [a, b]
        else:
            a = _sample_scene(rng, size, rng.choices((1, 2, 3), weights=n_obj_weights)[0])
            if a and _key(a, size) not in taken and _captionable(split, p, seed, size, [a]):
                return [a]
    raise RuntimeError(f"no unused scene for {split}[{p}]: too many images for the scene space")


def _captionable(split: str, p: int, seed: int, size: int, scenes: list[list[Obj]]) -> bool:
    """Whether `_work` can word the captions of these scenes (with the generator it will use): a rare twin pair
    whose captions would all be true of both scenes is drawn again instead of failing the whole dataset."""
    rng = _caption_rng(seed, split, p)
    try:
        for k, objs in enumerate(scenes):
            _captions(rng, objs, size, scenes[1 - k] if len(scenes) == 2 else None)
    except RuntimeError:
        return False
    return True


def _caption_rng(seed: int, split: str, p: int) -> random.Random:
    return random.Random(f"shapes/{seed}/{split}/{p}/captions")


def _slots(split: str, n: int) -> Iterator[tuple[int, bool]]:
    """(position, is_pair). Val/test pair positions 4k, 4k+1 as twins (half the images); train pairs 8k, 8k+1
    as unmarked hard pairs (a quarter), which teaches models word order."""
    every, p = (8 if split == "train" else 4), 0
    while p < n:
        pair = p % every == 0 and p + 1 < n
        yield p, pair
        p += 2 if pair else 1


_STATE: dict[str, Any] = {}  # per-process settings, set once by _init_worker instead of pickled with every job


def _init_worker(state: dict[str, Any]) -> None:
    _STATE.update(state)


def _work(job: tuple[str, int, bool, list[list[Obj]] | None]) -> tuple[str, int, list[tuple[list[Obj], list[dict]]]]:
    """Sample (train only), caption and render one slot; returns (split, position, [(objects, sentences)]), each
    sentence {"raw": caption, "negatives": [{"raw", "type"}, ...]}."""
    split, p, pair, scenes = job
    seed, size, out = _STATE["seed"], _STATE["size"], _STATE["out"]
    if scenes is None:  # train: val/test keys are final, so train scenes can be drawn here in parallel
        scenes = _sample_slot(split, p, pair, seed, size, _STATE["taken"])
    rng = _caption_rng(seed, split, p)
    result = []
    for k, objs in enumerate(scenes):
        twin = scenes[1 - k] if len(scenes) == 2 else None
        sentences = []
        for c, wording in enumerate(_captions(rng, objs, size, twin)):
            # own generator per caption: the negatives never shift the captions (or pixels) of a dataset
            neg_rng = random.Random(f"shapes/{seed}/{split}/{p + k}/negatives/{c}")
            sentences.append({"raw": wording.render(), "negatives": exact_negatives(wording, objs, size, neg_rng)})
        result.append((objs, sentences))
        _render(
            f"{out}/images/{_STATE['offsets'][split] + p + k:06d}.png", objs, size, [seed, SPLITS.index(split), p + k]
        )
    return split, p, result


@functools.cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5  # (size, size) each, in [-0.5, 0.5)
    return yy, xx


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A solid colour or a soft two-colour gradient, optionally with light noise: (size, size, 3) uint8."""
    i, j = rng.choice(len(BACKGROUNDS), 2, replace=False)
    c1, c2 = np.array(BACKGROUNDS[i], np.float32), np.array(BACKGROUNDS[j], np.float32)
    if rng.random() < 0.4:
        arr = np.broadcast_to(c1, (size, size, 3))
    else:
        theta, (yy, xx) = rng.uniform(0, 2 * math.pi), _grid(size)
        t = np.clip(xx * math.cos(theta) + yy * math.sin(theta) + 0.5, 0, 1)[..., None]  # (size, size, 1)
        arr = c1 * (1 - t) + c2 * t
    sigma = rng.choice((0.0, 3.0, 6.0))
    if sigma:
        arr = arr + rng.normal(0, sigma, arr.shape).astype(np.float32)
    return np.clip(arr, 0, 255).round().astype(np.uint8)


def _render(path: str, objs: list[Obj], size: int, entropy: list[int]) -> None:
    """Render one image from its own RNG. Each object's mask is drawn at 4x over its box only, LANCZOS-downsampled
    to an alpha mask and the colour pasted through it: cheaper than supersampling the whole canvas."""
    img = Image.fromarray(_background(np.random.default_rng(entropy), size))
    ss = SUPERSAMPLE
    for o in objs:
        x0, y0 = max(0, int(o["box"][0]) - 1), max(0, int(o["box"][1]) - 1)  # patch, 1 px beyond the box
        x1, y1 = min(size, math.ceil(o["box"][2]) + 1), min(size, math.ceil(o["box"][3]) + 1)
        mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
        draw = ImageDraw.Draw(mask)
        # PIL puts pixel centres on integer coordinates; ours are at +0.5 (box [0, size] spans the image).
        r, cx, cy = o["d"] / 2 * ss, (o["cx"] - x0) * ss - 0.5, (o["cy"] - y0) * ss - 0.5
        unit = UNIT_SHAPES[o["shape"]]
        if unit is None:
            draw.ellipse((cx - r + 0.5, cy - r + 0.5, cx + r - 0.5, cy + r - 0.5), fill=255)
        else:
            draw.polygon([(cx + r * ux, cy + r * uy) for ux, uy in unit], fill=255)
        img.paste(COLORS[o["color"]][0], (x0, y0, x1, y1), mask.resize((x1 - x0, y1 - y0), Image.LANCZOS))
    img.save(path, format="PNG")


def _entry(objs: list[Obj], sentences: list[dict], imgid: int, split: str) -> dict:
    """One image of the Karpathy JSON; every image has 5 captions, so sentids are 5 * imgid + k. A sentence
    keeps its exact negatives under "negatives" (when it has any)."""
    sents = []
    for k, sent in enumerate(sentences):
        raw, sentid = sent["raw"], 5 * imgid + k
        sents.append({"raw": raw, "tokens": re.findall(r"[a-z]+", raw.lower()), "imgid": imgid, "sentid": sentid})
        if sent["negatives"]:
            sents[-1]["negatives"] = sent["negatives"]
    return {"filename": f"{imgid:06d}.png", "imgid": imgid, "split": split, "sentids": [s["sentid"] for s in sents],
            "sentences": sents, "boxes": [o["box"] for o in objs],
            "objects": [{k: o[k] for k in ("shape", "color", "size")} for o in objs]}  # fmt: skip


def generate_shapes(
    out: str | Path,
    n_train: int = 10000,
    n_val: int = 1000,
    n_test: int = 1000,
    seed: int = 0,
    size: int = 64,
    workers: int | None = None,
    progress: bool = False,
) -> Path:
    """Render the dataset into out/images/*.png and write out/dataset.json; returns the json path.

    Args:
        out: output directory (created if missing).
        n_train, n_val, n_test: number of images per split.
        seed: everything (scenes, captions, pixels) is a deterministic function of it.
        size: image side in pixels; object sizes and relation margins scale with it.
        workers: processes; default min(2, cpu count). The output does not depend on it.
        progress: show a tqdm bar.
    Raises:
        ConfigError: a size, count or seed out of range, or `out` is not a folder (one line, before any work).
    """
    _check_request(Path(out), {"--train": n_train, "--val": n_val, "--test": n_test}, seed, size)
    out = Path(out)
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create --out {out}: {err.strerror or err}") from err
    t0 = time.perf_counter()
    counts = {"train": n_train, "val": n_val, "test": n_test}
    offsets = {"train": 0, "val": n_train, "test": n_train + n_val}  # imgids run train, val, test
    # Test first, then val: each eval scene is new to all earlier ones, and the test set does not depend on
    # --val or --train. Train scenes are then drawn in the workers and only have to avoid these keys.
    taken: set[str] = set()
    jobs: list[tuple[str, int, bool, list[list[Obj]] | None]] = []
    for split in ("test", "val"):
        for p, pair in _slots(split, counts[split]):
            scenes = _sample_slot(split, p, pair, seed, size, taken)
            taken.update(_key(objs, size) for objs in scenes)
            jobs.append((split, p, pair, scenes))
    jobs += [("train", p, pair, None) for p, pair in _slots("train", n_train)]
    state = {"seed": seed, "size": size, "out": str(out), "taken": taken, "offsets": offsets}

    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    images: dict[int, dict] = {}
    if workers > 1:
        with Pool(workers, initializer=_init_worker, initargs=(state,)) as pool:
            _collect(pool.imap_unordered(_work, jobs, chunksize=8), images, offsets, len(jobs), progress)
    else:
        _init_worker(state)
        _collect(map(_work, jobs), images, offsets, len(jobs), progress)

    json_path = out / "dataset.json"
    ordered = [images[i] for i in range(len(images))]
    write_text(out / NEGATIVES_FILE, "".join(json.dumps(t) + "\n" for t in negative_triples(ordered, "test")))
    # the json appears only once every image is written
    write_text(json_path, json.dumps({"dataset": "shapes", "images": ordered}))
    logger.info("shapes: %d images at %d px in %.1fs with %d workers -> %s", len(images), size,
                time.perf_counter() - t0, workers, json_path)  # fmt: skip
    return json_path


NEGATIVES_FILE = "test_negatives.jsonl"
MIN_SIZE, MAX_SIZE = 24, 4096  # --size: three objects must fit; a side beyond 4096 px is no toy dataset
MAX_IMAGES = 10_000_000  # per split


def _check_request(out: Path, counts: dict[str, int], seed: int, size: int) -> None:
    """`generate_shapes`' arguments, each in range (the CLI's flags are named in the messages)."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"--size {size}: must be {MIN_SIZE} to {MAX_SIZE} px (three objects must fit)")
    for flag, n in counts.items():
        if not 0 <= n <= MAX_IMAGES:
            raise ConfigError(f"{flag} {n}: must be 0 to {MAX_IMAGES:,} images")
    if not sum(counts.values()):
        raise ConfigError("--train, --val and --test are all 0: the dataset would hold no image")
    if not 0 <= seed < 2**63:
        raise ConfigError(f"--seed {seed}: must be 0 to 2**63 - 1")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")


def negative_triples(images: Iterable[dict], split: str = "test") -> Iterator[dict[str, str]]:
    """The SugarCrepe/ARO-style triples of one split from Karpathy image entries with sentence "negatives":
    {"image": "images/<filename>" (relative to the dataset root), "caption", "negative", "type"}, in file order."""
    for img in images:
        if img["split"] != split:
            continue
        for sent in img["sentences"]:
            for neg in sent.get("negatives", []):
                yield {"image": f"images/{img['filename']}", "caption": sent["raw"], "negative": neg["raw"],
                       "type": neg["type"]}  # fmt: skip


def _collect(results: Iterable, images: dict[int, dict], offsets: dict[str, int], total: int, progress: bool) -> None:
    """Turn worker results into JSON entries; twins are marked on val/test only (train pairs stay unmarked)."""
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=total, desc="shapes", unit="slot")
    for split, p, scenes in results:
        for k, (objs, sentences) in enumerate(scenes):
            imgid = offsets[split] + p + k
            images[imgid] = _entry(objs, sentences, imgid, split)
            if len(scenes) == 2 and split != "train":
                images[imgid]["twin"] = offsets[split] + p + 1 - k

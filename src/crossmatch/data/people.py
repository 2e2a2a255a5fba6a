"""Synthetic people: an offline text-based person search dataset rendered with PIL, in CUHK-PEDES's format.

Each identity is a pedestrian figure (a gender-neutral body) with the attributes that CUHK-PEDES captions
(Li et al., "Person Search with Natural Language Description", CVPR 2017) talk about: hair (colour,
length), an optional cap, an upper garment (t-shirt, long sleeves, jacket or dress; colour; optional stripes
and a logo on the front), a lower garment (trousers, shorts or skirt; none with a dress), shoes, an optional
bag (backpack or handbag) and an optional carried item. Its images change what a re-identification system
must ignore: pose (arm and leg angles), view (front, back, side), scale and position in the crop,
background clutter, brightness and colour cast, and an occluder that hides the feet. Captions are written
from the attributes with varied templates and synonyms and name only what is visible in that view: a
backpack shows from behind and from the side, a logo only in front, shoes not behind an occluder.

Hard cases on purpose: *twin* identities, pairs that differ only in which garment has which colour (red top
and blue trousers vs blue top and red trousers), in the shoe colour, or in the handbag; every record of a
twin carries `twin_pid` (the other identity), and what differs is visible in every image of both, so each
caption tells the two apart. Evaluation reports twin accuracy by identity (`metrics.twin_identity_accuracy`).

The output is `imgs/{split}/{pid:05d}_{k}.png` plus `reid_raw.json`, a list of image records {"file_path",
"id", "split", "captions", "processed_tokens"} as CUHK-PEDES distributes it, so `data.format=cuhk_pedes`
reads it, plus "twin_pid" and "twin_differs" (the attribute names that differ) on twins, "attributes" (the
identity) and "view" ({"view", "occluded"}). Identities are disjoint across splits and
unique (no two share their attributes); ids run 1.. over train, val, test. Every identity is a function of
`(seed, split, position)` (planned test first, then val, then train, in the parent: de-duplication needs a
global view), every image and caption of its own RNG in a process pool, so the worker count changes nothing.

Coordinates: x right, y down, in output pixels; `h` is the figure's height from the top of its head to
the soles of its shoes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from crossmatch.errors import ConfigError
from crossmatch.files import write_text

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
ANNOTATION_FILE, IMAGE_DIR = "reid_raw.json", "imgs"  # as CUHK-PEDES (crossmatch.data.pedes reads them)
SUPERSAMPLE = 4  # draw at 4x, then a 4x4 box filter: anti-aliased edges, exact colours inside each part
MAX_TRIES = 10_000

# Garment colours: RGB, then caption words (the first is the name stored in "attributes").
COLORS = {
    "red": ((200, 30, 35), ("red", "crimson")),
    "blue": ((35, 75, 205), ("blue",)),
    "green": ((40, 150, 60), ("green",)),
    "yellow": ((240, 205, 30), ("yellow",)),
    "black": ((25, 25, 28), ("black",)),
    "white": ((245, 245, 245), ("white",)),
    "grey": ((128, 128, 128), ("grey", "gray")),
    "pink": ((240, 135, 185), ("pink",)),
    "purple": ((120, 45, 165), ("purple",)),
    "orange": ((245, 130, 20), ("orange",)),
    "brown": ((120, 75, 40), ("brown",)),
}
HAIR = {
    "black": ((30, 25, 22), ("black", "dark")),
    "brown": ((105, 62, 30), ("brown",)),
    "blonde": ((225, 195, 115), ("blonde", "fair")),
    "red": ((175, 72, 30), ("red", "ginger")),
    "grey": ((165, 165, 165), ("grey", "gray", "silver")),
}
SKIN = ((240, 205, 175), (205, 160, 120), (150, 100, 65), (95, 60, 40))
EYES = (20, 20, 20)
UPPER_WORDS = {
    "tshirt": ("t-shirt", "short-sleeved shirt", "short-sleeved top", "tee"),
    "longsleeve": ("long-sleeved shirt", "long-sleeved top", "sweater"),
    "jacket": ("jacket", "coat", "zip-up jacket"),
    "dress": ("dress", "sleeveless dress"),
}
LOWER_WORDS = {"trousers": ("trousers", "pants", "long pants"), "shorts": ("shorts",), "skirt": ("skirt",)}
SHOE_WORDS = ("shoes", "sneakers", "trainers")
BAG_WORDS = {"backpack": ("backpack", "rucksack"), "handbag": ("handbag", "purse", "hand bag")}
ITEM_WORDS = {"umbrella": ("umbrella",), "bottle": ("bottle", "water bottle"), "book": ("book", "folder")}
HAT_WORDS = ("cap", "hat")
SUBJECTS = ("The person", "This person", "A person", "The pedestrian", "A pedestrian", "This pedestrian")
WEARS = ("wears", "is wearing", "is dressed in", "has on")
VIEW_SENTENCES = {
    "front": ("They are walking towards the camera.", "They face the camera."),
    "back": ("They are walking away from the camera.", "They are seen from behind."),
    "side": ("They are walking to one side.", "They are seen from the side."),
}
VIEWS = ("front", "back", "side")
# What each view hides: a backpack is on the back, a logo on the front of the top.
HIDDEN = {"front": {"backpack"}, "back": {"logo"}, "side": {"logo"}}
TWIN_KINDS = ("swap_colors", "shoes", "handbag")
DEFAULTS = {"n_train": 1500, "n_val": 200, "n_test": 200, "images_per_id": 4, "captions_per_image": 2}


# ------------------------------------------------------------------------------------------- identities


def _pick(rng: random.Random, weights: dict[str, float]):
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def sample_attributes(rng: random.Random) -> dict[str, Any]:
    """One identity: {"hair_color", "hair_length", "hat", "upper", "upper_color", "stripes", "logo", "lower",
    "lower_color", "shoes", "bag", "bag_color", "item", "item_color", "skin"}; an absent part is None (colours
    are keys of COLORS, hair colours of HAIR; "skin" indexes SKIN and is never captioned)."""
    names = list(COLORS)
    a: dict[str, Any] = {
        "hair_color": _pick(rng, {"black": 0.35, "brown": 0.3, "blonde": 0.15, "red": 0.08, "grey": 0.12}),
        "hair_length": _pick(rng, {"short": 0.55, "long": 0.45}),
        "hat": rng.choice(names) if rng.random() < 0.2 else None,
        "upper": _pick(rng, {"tshirt": 0.35, "longsleeve": 0.25, "jacket": 0.25, "dress": 0.15}),
        "upper_color": rng.choice(names),
    }
    contrast = [c for c in ("white", "black", "red", "blue", "yellow") if c != a["upper_color"]]
    a["stripes"] = rng.choice(contrast) if a["upper"] != "jacket" and rng.random() < 0.2 else None
    a["logo"] = rng.choice(contrast) if a["upper"] in ("tshirt", "longsleeve") and rng.random() < 0.3 else None
    if a["upper"] == "dress":
        a["lower"] = a["lower_color"] = None
    else:
        a["lower"] = _pick(rng, {"trousers": 0.6, "shorts": 0.2, "skirt": 0.2})
        a["lower_color"] = rng.choice([c for c in names if c != a["upper_color"]])
    a["shoes"] = rng.choice(("black", "white", "grey", "brown", "red", "blue"))
    a["bag"] = _pick(rng, {None: 0.45, "backpack": 0.3, "handbag": 0.25})
    a["bag_color"] = rng.choice(names) if a["bag"] else None
    a["item"] = _pick(rng, {None: 0.7, "umbrella": 0.1, "bottle": 0.1, "book": 0.1})
    a["item_color"] = rng.choice(names) if a["item"] else None
    a["skin"] = rng.randrange(len(SKIN))
    return a


def identity_key(a: dict[str, Any]) -> str:
    """What a caption can tell apart (everything but the skin tone): no two identities may share it."""
    return json.dumps({k: v for k, v in a.items() if k != "skin"}, sort_keys=True)


def make_twin(rng: random.Random, a: dict[str, Any]) -> tuple[dict, dict, str, list[str]] | None:
    """A twin pair from `a`: (a', b, kind, the attribute names in which they differ), or None when `a`
    cannot have that kind of twin. A handbag twin first gives `a` a handbag (visible in every view)."""
    kind = rng.choice(TWIN_KINDS)
    a, b = dict(a), dict(a)
    if kind == "swap_colors":
        if a["lower"] is None or {a["stripes"], a["logo"]} & {a["lower_color"]}:
            return None  # a dress has no lower garment; a stripe or logo colour must stay distinct from the top
        b["upper_color"], b["lower_color"] = a["lower_color"], a["upper_color"]
        return a, b, kind, ["lower_color", "upper_color"]
    if kind == "shoes":
        b["shoes"] = rng.choice([c for c in ("black", "white", "grey", "brown", "red", "blue") if c != a["shoes"]])
        return a, b, kind, ["shoes"]
    a["bag"], a["bag_color"] = "handbag", rng.choice(list(COLORS))
    if rng.random() < 0.5:
        b["bag"], b["bag_color"] = None, None
        return a, b, kind, ["bag", "bag_color"]
    b["bag"], b["bag_color"] = "handbag", rng.choice([c for c in COLORS if c != a["bag_color"]])
    return a, b, kind, ["bag_color"]


def twin_kind(differs: Sequence[str]) -> str:
    """The kind (one of TWIN_KINDS) of a twin pair from the attribute names it differs in, as `make_twin`
    returns them and a record's "twin_differs" stores them."""
    if set(differs) == {"upper_color", "lower_color"}:
        return "swap_colors"
    if set(differs) == {"shoes"}:
        return "shoes"
    if set(differs) <= {"bag", "bag_color"}:
        return "handbag"
    raise ValueError(f"no twin kind differs in {list(differs)}")


def _slots(split: str, n: int) -> Iterable[tuple[int, bool]]:
    """(position, is_pair): val/test identities 4k, 4k+1 are twins (half of them), train 8k, 8k+1 (a quarter)."""
    every, p = (8 if split == "train" else 4), 0
    while p < n:
        pair = p % every == 0 and p + 1 < n
        yield p, pair
        p += 2 if pair else 1


def plan_identities(counts: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Per split, its identities in order: {"attributes", "twin"?: (position of the other, kind, differs)}."""
    taken: set[str] = set()
    plan: dict[str, list[dict]] = {}
    for split in ("test", "val", "train"):  # the test set does not depend on --val or --train
        people: list[dict] = []
        for p, pair in _slots(split, counts[split]):
            rng = random.Random(f"people/{seed}/{split}/{p}")  # str seeds are hashed with sha512: stable
            for _ in range(MAX_TRIES):
                a = sample_attributes(rng)
                twin = make_twin(rng, a) if pair else None
                if pair and twin is None:
                    continue
                group = [twin[0], twin[1]] if twin else [a]
                keys = {identity_key(x) for x in group}
                if len(keys) == len(group) and not keys & taken:
                    break
            else:
                raise RuntimeError(f"no unused identity for {split}[{p}]: too many identities")
            taken |= keys
            if twin:
                people.append({"attributes": group[0], "twin": (p + 1, twin[2], twin[3])})
                people.append({"attributes": group[1], "twin": (p, twin[2], twin[3])})
            else:
                people.append({"attributes": a})
        plan[split] = people
    return plan


# ---------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Shot:
    """How one image shows its identity: everything a re-identification system must ignore."""

    view: str  # front | back | side
    facing: int  # side view: +1 faces right, -1 left
    h: float  # figure height (px)
    cx: float  # figure centre x (px)
    top: float  # y of the top of the head (px)
    arms: tuple[float, float]  # angles from vertical (degrees, + away from the body / forward in side view)
    legs: tuple[float, float]  # same for the legs
    occluder: float | None  # y where an occluder in front of the lower legs starts (it hides the shoes)
    gain: tuple[float, float, float]  # per-channel brightness and colour cast
    noise: float  # std of Gaussian pixel noise
    scene: int  # seed of the background and its clutter


def sample_shot(rng: random.Random, size: tuple[int, int], view: str, may_occlude: bool = True) -> Shot:
    """A random shot of one view at image size (H, W); `may_occlude` False: never an occluder (the images of
    a shoe twin, whose shoes tell it from its twin)."""
    H, W = size
    h = min(H, 2 * W) * rng.uniform(0.78, 0.95)  # the figure is about 0.45 h wide: it fits the crop
    margin = max(0.0, W / 2 - 0.26 * h)
    cx = W / 2 + rng.uniform(-margin, margin)
    top = rng.uniform(0.01 * H, max(0.01 * H, 0.99 * H - h))
    if view == "side":
        swing, stride = rng.uniform(5, 30), rng.uniform(5, 22)
        arms, legs = (swing, -swing), (-stride, stride)  # each arm swings against its leg
    else:
        arms, legs = (rng.uniform(3, 12), rng.uniform(3, 12)), (rng.uniform(1, 6), rng.uniform(1, 6))
    occluder = top + h * rng.uniform(0.7, 0.86) if rng.random() < 0.2 and may_occlude else None
    brightness = rng.uniform(0.75, 1.15)
    gain = tuple(round(brightness * rng.uniform(0.9, 1.1), 4) for _ in range(3))
    return Shot(view, rng.choice((-1, 1)), h, cx, top, arms, legs, occluder, gain, rng.choice((0.0, 2.0, 4.0)),
                rng.randrange(2**31))  # fmt: skip


def keypoints(shot: Shot) -> dict[str, tuple[float, float]]:
    """Named points of the figure (px): "head" (centre; radius in "head_r"), the joints and ends of each limb
    ("shoulder_i", "hand_i", "hip_i", "foot_i"; i = 0 left / 1 right in front and back views, in side view 0
    the near limb), the centre of each shoe ("shoe_i"), and "torso": a point of the top's own colour (clear
    of its stripes, zip and logo) in front and back views."""
    h, cx, y0 = shot.h, shot.cx, shot.top
    side = shot.view == "side"
    pts: dict[str, Any] = {"head": (cx, y0 + 0.075 * h), "head_r": 0.065 * h, "torso": (cx - 0.05 * h, y0 + 0.335 * h)}
    for i, sign in enumerate((-1, 1)):
        shoulder = (cx if side else cx + sign * 0.1 * h, y0 + 0.18 * h)
        hip = (cx if side else cx + sign * 0.055 * h, y0 + 0.48 * h)
        out = shot.facing if side else sign  # + angle: forward in side view, outward otherwise
        arm, leg = math.radians(shot.arms[i]), math.radians(shot.legs[i])
        pts[f"shoulder_{i}"], pts[f"hip_{i}"] = shoulder, hip
        pts[f"hand_{i}"] = (shoulder[0] + out * 0.32 * h * math.sin(arm), shoulder[1] + 0.32 * h * math.cos(arm))
        foot = (hip[0] + out * 0.44 * h * math.sin(leg), hip[1] + 0.44 * h * math.cos(leg))
        pts[f"foot_{i}"], pts[f"shoe_{i}"] = (
            foot,
            (foot[0] + (0.02 * h * shot.facing if side else 0), foot[1] + 0.01 * h),
        )
    return pts


def _muted(rng: random.Random) -> tuple[int, int, int]:
    g = rng.randint(70, 190)
    return tuple(max(0, min(255, g + rng.randint(-22, 22))) for _ in range(3))


class _Canvas:
    """PIL drawing in output pixels on a SUPERSAMPLE-times larger image."""

    def __init__(self, size: tuple[int, int], color):
        H, W = size
        self.img = Image.new("RGB", (W * SUPERSAMPLE, H * SUPERSAMPLE), color)
        self.draw = ImageDraw.Draw(self.img)

    def poly(self, pts, fill) -> None:
        self.draw.polygon([(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in pts], fill=fill)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill) -> None:
        s = SUPERSAMPLE
        self.draw.ellipse(((cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s), fill=fill)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill)

    def limb(self, p, q, width: float, fill, t0: float = 0.0, t1: float = 1.0) -> None:
        """The part [t0, t1] of a round-capped limb from p to q."""
        a = (p[0] + (q[0] - p[0]) * t0, p[1] + (q[1] - p[1]) * t0)
        b = (p[0] + (q[0] - p[0]) * t1, p[1] + (q[1] - p[1]) * t1)
        dx, dy = b[0] - a[0], b[1] - a[1]
        n = math.hypot(dx, dy) or 1.0
        ox, oy = -dy / n * width / 2, dx / n * width / 2
        self.poly([(a[0] + ox, a[1] + oy), (b[0] + ox, b[1] + oy), (b[0] - ox, b[1] - oy), (a[0] - ox, a[1] - oy)],
                  fill)  # fmt: skip
        self.ellipse(*a, width / 2, width / 2, fill)
        self.ellipse(*b, width / 2, width / 2, fill)


def _background(c: _Canvas, shot: Shot, size: tuple[int, int]) -> None:
    """A wall, a ground line and 2-6 clutter rectangles (windows, signs, poles), all in muted colours."""
    H, W = size
    rng = random.Random(shot.scene)
    c.rect(0, 0, W, H, _muted(rng))
    ground = min(H, shot.top + shot.h * rng.uniform(0.75, 1.05))
    c.rect(0, ground, W, H, _muted(rng))
    for _ in range(rng.randint(2, 6)):
        x, y = rng.uniform(-5, W), rng.uniform(-5, ground)
        pole = rng.random() < 0.3
        w, hh = (rng.uniform(1, 3), rng.uniform(20, H)) if pole else (rng.uniform(4, 20), rng.uniform(4, 25))
        c.rect(x, y, x + w, y + hh, _muted(rng))


def _legs(c: _Canvas, a: dict, pts: dict, h: float, order: Iterable[int]) -> None:
    """Legs back to front in `order`, the lower garment over them, then the shoes."""
    skin, lower = SKIN[a["skin"]], COLORS[a["lower_color"]][0] if a["lower"] else None
    for i in order:
        hip, foot = pts[f"hip_{i}"], pts[f"foot_{i}"]
        c.limb(hip, foot, 0.075 * h, skin)
        if a["lower"] == "trousers":
            c.limb(hip, foot, 0.08 * h, lower, 0.0, 0.93)
        elif a["lower"] == "shorts":
            c.limb(hip, foot, 0.085 * h, lower, 0.0, 0.42)
        c.ellipse(*pts[f"shoe_{i}"], 0.05 * h, 0.025 * h, COLORS[a["shoes"]][0])


def _torso(c: _Canvas, a: dict, shot: Shot, pts: dict) -> None:
    """Upper garment (a dress runs down to the knees), its stripes, and in front its zip and logo."""
    h, cx, y0 = shot.h, shot.cx, shot.top
    tw, ww = (0.075 * h, 0.07 * h) if shot.view == "side" else (0.125 * h, 0.105 * h)  # half widths
    color = COLORS[a["upper_color"]][0]
    if a["lower"] == "skirt":
        hem = 0.2 * h if shot.view != "side" else 0.13 * h
        c.poly([(cx - ww, y0 + 0.46 * h), (cx + ww, y0 + 0.46 * h), (cx + hem, y0 + 0.66 * h),
                (cx - hem, y0 + 0.66 * h)], COLORS[a["lower_color"]][0])  # fmt: skip
    bottom, hem = (0.7, 0.19 if shot.view != "side" else 0.13) if a["upper"] == "dress" else (0.49, ww / h)
    shape = [(cx - tw, y0 + 0.16 * h), (cx + tw, y0 + 0.16 * h), (cx + ww, y0 + 0.45 * h),
             (cx + hem * h, y0 + bottom * h), (cx - hem * h, y0 + bottom * h), (cx - ww, y0 + 0.45 * h)]  # fmt: skip
    c.poly(shape, color)
    if a["stripes"]:  # bands [0.205, 0.235] + 0.08 k of h: the torso point at 0.335 stays clear
        for yy in np.arange(0.205, bottom - 0.03, 0.08):
            half = np.interp(yy + 0.015, (0.16, 0.45, bottom), (tw, ww, hem * h))  # the garment's half width there
            c.rect(cx - half, y0 + yy * h, cx + half, y0 + (yy + 0.03) * h, COLORS[a["stripes"]][0])
    if shot.view == "front" and a["upper"] == "jacket":
        c.rect(cx - 0.006 * h, y0 + 0.17 * h, cx + 0.006 * h, y0 + 0.49 * h, tuple(v // 2 for v in color))
    if shot.view == "front" and a["logo"]:
        c.ellipse(cx + 0.04 * h, y0 + 0.27 * h, 0.025 * h, 0.025 * h, COLORS[a["logo"]][0])  # below long hair


def _arm(c: _Canvas, a: dict, pts: dict, h: float, i: int) -> None:
    shoulder, hand, skin = pts[f"shoulder_{i}"], pts[f"hand_{i}"], SKIN[a["skin"]]
    c.limb(shoulder, hand, 0.055 * h, skin)
    sleeve = {"tshirt": 0.35, "longsleeve": 0.92, "jacket": 0.95}.get(a["upper"], 0.0)
    if sleeve:
        c.limb(shoulder, hand, 0.065 * h, COLORS[a["upper_color"]][0], 0.0, sleeve)
    c.ellipse(*hand, 0.032 * h, 0.032 * h, skin)


def _head(c: _Canvas, a: dict, shot: Shot, pts: dict) -> None:
    (hx, hy), r = pts["head"], pts["head_r"]
    hair, skin, s = HAIR[a["hair_color"]][0], SKIN[a["skin"]], SUPERSAMPLE
    long = a["hair_length"] == "long"
    back = -shot.facing if shot.view == "side" else 0
    if long and shot.view == "front":  # two strands over the shoulders, clear of the logo below them
        c.rect(hx - 1.1 * r, hy, hx - 0.75 * r, hy + 2.4 * r, hair)
        c.rect(hx + 0.75 * r, hy, hx + 1.1 * r, hy + 2.4 * r, hair)
    elif long and shot.view == "side":  # down the back of the head
        x0 = hx + back * 0.6 * r - 1.05 * r
        c.rect(x0, hy, x0 + 2.1 * r, hy + 2.4 * r, hair)
    c.ellipse(hx, hy, r, r, hair if shot.view == "back" else skin)
    box = ((hx - r * 1.05) * s, (hy - r * 1.08) * s, (hx + r * 1.05) * s, (hy + r * 1.02) * s)
    if shot.view == "front":
        c.draw.chord(box, 180, 360, fill=hair)
        c.ellipse(hx - 0.35 * r, hy + 0.15 * r, 0.12 * r, 0.12 * r, EYES)
        c.ellipse(hx + 0.35 * r, hy + 0.15 * r, 0.12 * r, 0.12 * r, EYES)
    elif shot.view == "side":  # hair over the back half and the top
        start = 90 if back < 0 else 270
        c.draw.pieslice(box, start, start + 180, fill=hair)
        c.draw.chord(box, 190, 350, fill=hair)
        c.ellipse(hx + shot.facing * 0.5 * r, hy + 0.1 * r, 0.12 * r, 0.12 * r, EYES)
    if long and shot.view == "back":  # down the back, over the top
        c.rect(hx - 1.05 * r, hy, hx + 1.05 * r, hy + 2.4 * r, hair)
    if a["hat"]:
        hat = COLORS[a["hat"]][0]
        c.draw.chord(((hx - r * 1.08) * s, (hy - r * 1.15) * s, (hx + r * 1.08) * s, (hy + r * 0.4) * s), 180, 360,
                     fill=hat)  # fmt: skip
        brim = shot.facing if shot.view == "side" else 0
        x0, x1 = sorted((hx, hx + brim * 1.8 * r)) if brim else (hx - 1.1 * r, hx + 1.1 * r)
        c.rect(x0, hy - 0.42 * r, x1, hy - 0.3 * r, hat)


def _carried(c: _Canvas, a: dict, shot: Shot, pts: dict) -> None:
    """The handbag hangs from hand 1 (side view: at the hip), the item is held in hand 0 (side view: the near
    hand, which is hand 0)."""
    h = shot.h
    if a["bag"] == "handbag":
        color = COLORS[a["bag_color"]][0]
        x, y = pts["hand_1"] if shot.view != "side" else (shot.cx + shot.facing * 0.02 * h, shot.top + 0.44 * h)
        c.limb((x - 0.03 * h, y + 0.03 * h), (x, y - 0.01 * h), 0.012 * h, color)
        c.limb((x + 0.03 * h, y + 0.03 * h), (x, y - 0.01 * h), 0.012 * h, color)
        c.rect(x - 0.05 * h, y + 0.03 * h, x + 0.05 * h, y + 0.11 * h, color)
    if a["item"]:
        color, (x, y) = COLORS[a["item_color"]][0], pts["hand_0"]
        out = shot.facing if shot.view == "side" else -1
        if a["item"] == "umbrella":
            c.limb((x, y - 0.02 * h), (x + out * 0.07 * h, y + 0.36 * h), 0.035 * h, color)
        elif a["item"] == "bottle":
            c.rect(x - 0.015 * h, y - 0.02 * h, x + 0.015 * h, y + 0.07 * h, color)
        else:
            c.rect(x - 0.035 * h, y - 0.03 * h, x + 0.035 * h, y + 0.07 * h, color)


def render(a: dict[str, Any], shot: Shot, size: tuple[int, int]) -> Image.Image:
    """The image of identity `a` in `shot`: (H, W) = `size`, RGB. Back to front: background, far limbs,
    backpack (side view), legs, torso, backpack (back view), arms, head, carried things, occluder; then the
    colour cast and noise."""
    H, W = size
    c = _Canvas(size, (0, 0, 0))
    _background(c, shot, size)
    pts = keypoints(shot)
    h, cx, y0 = shot.h, shot.cx, shot.top
    backpack = COLORS[a["bag_color"]][0] if a["bag"] == "backpack" else None
    if shot.view == "side":
        _arm(c, a, pts, h, 1)  # the far arm, behind the body
        if backpack:
            x = cx - shot.facing * 0.07 * h
            c.rect(min(x, x - shot.facing * 0.08 * h), y0 + 0.19 * h, max(x, x - shot.facing * 0.08 * h), y0 + 0.43 * h,
                   backpack)  # fmt: skip
        _legs(c, a, pts, h, (1, 0))
    else:
        _legs(c, a, pts, h, (0, 1))
    _torso(c, a, shot, pts)
    if shot.view == "back" and backpack:
        c.rect(cx - 0.09 * h, y0 + 0.2 * h, cx + 0.09 * h, y0 + 0.43 * h, backpack)
    for i in (0,) if shot.view == "side" else (0, 1):
        _arm(c, a, pts, h, i)
    _head(c, a, shot, pts)
    _carried(c, a, shot, pts)
    if shot.occluder is not None:
        c.rect(-1, shot.occluder, W + 1, H + 1, _muted(random.Random(shot.scene + 1)))
    img = c.img.reduce(SUPERSAMPLE)  # box filter: a pixel inside one part keeps that part's exact colour
    if shot.gain == (1.0, 1.0, 1.0) and not shot.noise:
        return img
    arr = np.asarray(img, dtype=np.float32) * np.asarray(shot.gain, dtype=np.float32)  # (H, W, 3)
    if shot.noise:
        arr += np.random.default_rng(shot.scene).normal(0, shot.noise, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


# -------------------------------------------------------------------------------------------- captions


def visible(a: dict[str, Any], shot: Shot) -> dict[str, Any]:
    """The attributes a caption of this image may state: hidden ones (a backpack in front, a logo from
    behind or the side, shoes behind the occluder) are None."""
    v = dict(a)
    if "logo" in HIDDEN[shot.view]:
        v["logo"] = None
    if a["bag"] in HIDDEN[shot.view]:
        v["bag"] = v["bag_color"] = None
    if shot.occluder is not None:
        v["shoes"] = None
    return v


def _an(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _word(rng: random.Random, table: dict, key: str) -> str:
    return rng.choice(table[key][1])


def _phrases(rng: random.Random, v: dict[str, Any]) -> dict[str, str]:
    """A noun phrase per stated attribute, synonyms drawn from `rng`."""
    hair_color, length = _word(rng, HAIR, v["hair_color"]), v["hair_length"]
    out = {"hair": rng.choice((f"{length} {hair_color} hair", f"{hair_color} hair that is {length}"))}
    if length == "long" and rng.random() < 0.3:
        out["hair"] = f"long {hair_color} hair down to the shoulders"
    if v["hat"]:
        out["hat"] = _an(f"{_word(rng, COLORS, v['hat'])} {rng.choice(HAT_WORDS)}")
    top, color = rng.choice(UPPER_WORDS[v["upper"]]), _word(rng, COLORS, v["upper_color"])
    extras = []
    if v["stripes"]:
        stripe = _word(rng, COLORS, v["stripes"])
        if rng.random() < 0.5:
            top, extras = f"{color} and {stripe} striped {top}", extras
        else:
            top, extras = f"{color} {top}", [f"{stripe} stripes"]
    else:
        top = f"{color} {top}"
    if v["logo"]:
        logo = _word(rng, COLORS, v["logo"])
        extras.append(rng.choice((f"a {logo} logo on the front", f"a small {logo} logo on the chest")))
    out["upper"] = _an(top) + (" with " + " and ".join(extras) if extras else "")
    if v["lower"]:
        out["lower"] = f"{_word(rng, COLORS, v['lower_color'])} {rng.choice(LOWER_WORDS[v['lower']])}"
        if v["lower"] == "skirt":
            out["lower"] = _an(out["lower"])
    if v["shoes"]:
        out["shoes"] = f"{_word(rng, COLORS, v['shoes'])} {rng.choice(SHOE_WORDS)}"
    carried = []
    if v["bag"]:
        carried.append(_an(f"{_word(rng, COLORS, v['bag_color'])} {rng.choice(BAG_WORDS[v['bag']])}"))
    if v["item"]:
        carried.append(_an(f"{_word(rng, COLORS, v['item_color'])} {rng.choice(ITEM_WORDS[v['item']])}"))
    if carried:
        out["carried"] = _join(carried)
    return out


def caption(rng: random.Random, a: dict[str, Any], shot: Shot) -> str:
    """One CUHK-PEDES-style caption of this image, stating every visible attribute and nothing else, with
    gender-neutral wording (a subject noun or singular "they")."""
    v = visible(a, shot)
    p = _phrases(rng, v)
    worn = [p[k] for k in ("upper", "lower", "shoes") if k in p]
    if "hat" in p:
        worn.insert(rng.choice((0, len(worn))), p["hat"])
    subject, wears = rng.choice(SUBJECTS), rng.choice(WEARS)
    form = rng.randrange(4)
    if form == 0:
        sentences = [f"{subject} {wears} {_join(worn)}.", f"They have {p['hair']}."]
    elif form == 1:
        sentences = [f"{subject} with {p['hair']} {wears} {_join(worn)}."]
    elif form == 2:
        sentences = [f"{subject} has {p['hair']}.", f"They are wearing {_join(worn)}."]
    else:
        sentences = [f"{subject} in {_join(worn)} has {p['hair']}."]
    if "carried" in p:
        again = "The " + subject.split()[1]  # "A person ... The person carries"
        verbs = ["They carry", "They are carrying", f"{again} carries"]
        verbs += [] if v["bag"] == "backpack" else ["They are holding"]  # a backpack is worn, not held
        sentences.append(f"{rng.choice(verbs)} {p['carried']}.")
    if rng.random() < 0.25:
        sentences.append(rng.choice(VIEW_SENTENCES[shot.view]))
    text = " ".join(sentences)
    return text[0].upper() + text[1:]


def captions(rng: random.Random, a: dict[str, Any], shot: Shot, n: int) -> list[str]:
    """n distinct captions of one image."""
    out: list[str] = []
    for _ in range(MAX_TRIES):
        text = caption(rng, a, shot)
        if text not in out:
            out.append(text)
            if len(out) == n:
                return out
    raise RuntimeError(f"could not word {n} distinct captions")


def tokens(text: str) -> list[str]:
    """CUHK-PEDES's "processed_tokens" of a caption: lower-case words."""
    return re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower())


# ------------------------------------------------------------------------------------------- generation

_STATE: dict[str, Any] = {}  # per-process settings, set once by _init_worker instead of pickled with every job


def _init_worker(state: dict[str, Any]) -> None:
    _STATE.update(state)


def _work(job: tuple[str, int, dict]) -> tuple[str, int, list[dict]]:
    """Render and caption the images of one identity; returns (split, position, its image records)."""
    split, p, person = job
    seed, size, out, k_images, n_caps = (_STATE[k] for k in ("seed", "size", "out", "images", "captions"))
    pid = _STATE["offsets"][split] + p + 1
    a = person["attributes"]
    shoe_twin = "twin" in person and person["twin"][1] == "shoes"
    views_rng = random.Random(f"people/{seed}/{split}/{p}/views")
    views = [v for _ in range(-(-k_images // 3)) for v in views_rng.sample(VIEWS, 3)][:k_images]  # every view
    records = []
    for k, view in enumerate(views):
        rng = random.Random(f"people/{seed}/{split}/{p}/{k}")
        shot = sample_shot(rng, size, view, may_occlude=not shoe_twin)
        path = f"{split}/{pid:05d}_{k}.png"
        render(a, shot, size).save(Path(out) / IMAGE_DIR / path, format="PNG")
        caps = captions(random.Random(f"people/{seed}/{split}/{p}/{k}/captions"), a, shot, n_caps)
        rec = {"split": split, "captions": caps, "file_path": path, "processed_tokens": [tokens(t) for t in caps],
               "id": pid}  # fmt: skip
        if "twin" in person:
            rec["twin_pid"] = _STATE["offsets"][split] + person["twin"][0] + 1
            rec["twin_differs"] = person["twin"][2]
        rec["attributes"] = a
        rec["view"] = {"view": view, "occluded": shot.occluder is not None}
        records.append(rec)
    return split, p, records


def generate_people(
    out: str | Path,
    n_train: int = DEFAULTS["n_train"],
    n_val: int = DEFAULTS["n_val"],
    n_test: int = DEFAULTS["n_test"],
    images_per_id: int = DEFAULTS["images_per_id"],
    captions_per_image: int = DEFAULTS["captions_per_image"],
    size: tuple[int, int] = (128, 48),
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
) -> Path:
    """Render the dataset into out/imgs/{split}/*.png and write out/reid_raw.json; returns the json path.

    Args:
        out: output directory (created if missing).
        n_train, n_val, n_test: identities per split (ids unique across splits).
        images_per_id: images of each identity (views cycle through front, back and side).
        captions_per_image: distinct captions of each image.
        size: (H, W) of every image in pixels.
        seed: everything (identities, images, captions) is a deterministic function of it.
        workers: processes; default min(2, cpu count). The output does not depend on it.
        progress: show a tqdm bar.
    Raises:
        ConfigError: a count, size or seed out of range, or `out` is not a folder (one line, before any work).
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    _check_request(Path(out), counts, images_per_id, captions_per_image, size, seed)
    out, size = Path(out), (int(size[0]), int(size[1]))
    try:
        for split in SPLITS:
            (out / IMAGE_DIR / split).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create --out {out}: {err.strerror or err}") from err
    t0 = time.perf_counter()
    plan = plan_identities(counts, seed)
    offsets = {"train": 0, "val": n_train, "test": n_train + n_val}  # ids 1.. run train, val, test
    jobs = [(split, p, person) for split in SPLITS for p, person in enumerate(plan[split])]
    state = {"seed": seed, "size": size, "out": str(out), "offsets": offsets, "images": images_per_id,
             "captions": captions_per_image}  # fmt: skip
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    results: dict[tuple[str, int], list[dict]] = {}
    if workers > 1:
        with Pool(workers, initializer=_init_worker, initargs=(state,)) as pool:
            _collect(pool.imap_unordered(_work, jobs, chunksize=16), results, len(jobs), progress)
    else:
        _init_worker(state)
        _collect(map(_work, jobs), results, len(jobs), progress)
    records = [rec for split in SPLITS for p in range(counts[split]) for rec in results[split, p]]
    json_path = write_text(out / ANNOTATION_FILE, json.dumps(records))  # written once every image is
    logger.info("people: %d identities, %d images at %dx%d in %.1fs with %d workers -> %s", len(jobs), len(records),
                *size, time.perf_counter() - t0, workers, json_path)  # fmt: skip
    return json_path


def _collect(results: Iterable, out: dict, total: int, progress: bool) -> None:
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=total, desc="people", unit="id")
    for split, p, records in results:
        out[split, p] = records


MIN_H, MIN_W, MAX_SIDE = 48, 16, 2048  # a face, a hand and a shoe must stay a few pixels wide
MAX_IDS, MAX_PER_ID = 1_000_000, 100


def _check_request(out: Path, counts: dict[str, int], k: int, c: int, size: tuple[int, int], seed: int) -> None:
    """`generate_people`'s arguments, each in range (the CLI's flags are named in the messages)."""
    H, W = size
    if not (MIN_H <= H <= MAX_SIDE and MIN_W <= W <= MAX_SIDE):
        raise ConfigError(f"--size {H} {W}: H must be {MIN_H} to {MAX_SIDE} px and W {MIN_W} to {MAX_SIDE} px")
    for split, n in counts.items():
        if not 0 <= n <= MAX_IDS:
            raise ConfigError(f"--{split} {n}: must be 0 to {MAX_IDS:,} identities")
    if not sum(counts.values()):
        raise ConfigError("--train, --val and --test are all 0: the dataset would hold no identity")
    if not 1 <= k <= MAX_PER_ID:
        raise ConfigError(f"--images-per-id {k}: must be 1 to {MAX_PER_ID}")
    if not 1 <= c <= 10:
        raise ConfigError(f"--captions-per-image {c}: must be 1 to 10")
    if not 0 <= seed < 2**63:
        raise ConfigError(f"--seed {seed}: must be 0 to 2**63 - 1")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")

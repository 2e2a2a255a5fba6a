"""The rule-based caption perturber (crossmatch.data.negatives) on hand-written captions with exact outputs."""

from __future__ import annotations

import json

import pytest

from crossmatch.data.negatives import TYPES, Negative, candidates, normalise, perturb

COLOURS_BUT_RED = ("green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown", "grey")


def of_type(caption: str, kind: str) -> list[str]:
    return [n.text for n in candidates(caption) if n.type == kind]


def test_swap_attributes_exchanges_one_kind_of_attribute_between_two_objects():
    assert of_type("A red circle and a blue square.", "swap_attributes") == ["A blue circle and a red square."]
    # every mention of an object changes together ("the red circle" is the small red circle); sizes too
    caption = "a small red circle and a big blue box, the red circle is left of the blue box"
    assert of_type(caption, "swap_attributes") == [
        "a small blue circle and a big red box, the blue circle is left of the red box",
        "a big red circle and a small blue box, the red circle is left of the blue box",
    ]
    # "a"/"an" follow the new word
    assert of_type("an orange star and a red cross", "swap_attributes") == ["a red star and an orange cross"]


def test_swap_relation_exchanges_the_two_sides():
    assert of_type("a circle left of a square", "swap_relation") == ["a square left of a circle"]
    assert of_type("The red circle is to the left of the blue square.", "swap_relation") == [
        "The blue square is to the left of the red circle."
    ]
    assert of_type("A cat under a table.", "swap_relation") == ["A table under a cat."]


def test_flip_relation_replaces_the_relation_by_its_opposite():
    assert of_type("a cat under a table", "flip_relation") == ["a cat over a table"]
    assert of_type("A dog in front of a car.", "flip_relation") == ["A dog behind a car."]
    assert of_type("a horse bigger than a dog", "flip_relation") == ["a horse smaller than a dog"]
    # a compound relation flips one part at a time
    assert of_type("a circle above and to the left of a star", "flip_relation") == [
        "a circle below and to the left of a star",
        "a circle above and to the right of a star",
    ]


def test_replace_attribute_writes_another_value_of_the_same_kind():
    assert of_type("A red apple.", "replace_attribute") == [
        f"{'An' if c == 'orange' else 'A'} {c} apple." for c in COLOURS_BUT_RED
    ]
    assert of_type("A very small pumpkin.", "replace_attribute") == ["A very large pumpkin."]
    # a synonym of the same colour ("golden" is yellow) is never a replacement; sizes change class
    out = of_type("there is a tiny golden star", "replace_attribute")
    assert "there is a tiny yellow star" not in out and out[-1] == "there is a large golden star" and len(out) == 11


@pytest.mark.parametrize(
    "caption",
    [
        "A flower.",
        "The letter L.",
        "the left lane",  # "left" is no relation here
        "a car on the left",  # a place in the picture, not an object
        "the dog jumps over a fence",  # "jumps" ends the noun phrase: no NP-relation-NP
        "An orange.",  # the fruit: "orange" is its head, not a colour
        "A red and white anemone flower.",  # coordinated colours: no object named "red"
        "",
        "...",
    ],
)
def test_no_rule_applies_then_no_negative(caption):
    assert candidates(caption) == ()
    assert perturb(caption, 5, seed=0) == []


def test_rules_that_would_not_change_the_meaning_are_not_applied():
    # two circles that differ only in colour: swapping their colours describes the same picture
    assert of_type("a red circle and a blue circle", "swap_attributes") == []
    # one object only: nothing to swap
    assert of_type("a red car", "swap_attributes") == []
    # both sides the same: "a circle below a circle" says the same, so does the swap
    assert candidates("a circle above a circle") == ()
    # no second "blue circle" is made out of a red one
    assert "a blue circle and a blue circle" not in of_type("a red circle and a blue circle", "replace_attribute")


def test_perturb_is_deterministic_per_seed_and_mixes_the_types():
    caption = "A small red circle above a big blue box."
    assert perturb(caption, 4, seed=3) == perturb(caption, 4, seed=3)
    assert {n.type for n in perturb(caption, 4, seed=3)} == set(TYPES)  # round-robin over the four rules
    assert len({tuple(perturb(caption, 2, seed=s)) for s in range(10)}) > 1  # the seed chooses
    assert perturb(caption, 0, seed=1) == []
    assert len(perturb("A red apple.", 50, seed=0)) == 10  # all there are, no more


def test_outputs_never_equal_the_caption_and_are_distinct():
    for caption in ["A red circle and a red square.", "a small red circle left of a small red square", "A red apple!"]:
        out = candidates(caption)
        norms = [normalise(n.text) for n in out]
        assert normalise(caption) not in norms and len(set(norms)) == len(norms)
        assert all(isinstance(n, Negative) and n.type in TYPES for n in out)
    # swapping two identical colours changes nothing, so it is not offered
    assert of_type("A red circle and a red square.", "swap_attributes") == []


def test_every_shapes_caption_gets_negatives_none_of_them_a_caption_of_its_image(shapes_root):
    data = json.loads((shapes_root / "dataset.json").read_text())
    for img in data["images"]:
        own = [s["raw"] for s in img["sentences"]]
        for caption in own:
            out = candidates(caption)
            kinds = {n.type for n in out}
            assert "replace_attribute" in kinds, caption
            if len(img["objects"]) > 1:  # the scene's objects can swap attributes or relation sides
                assert kinds & {"swap_attributes", "swap_relation"}, caption
            assert not {normalise(n.text) for n in out} & {normalise(c) for c in own}, caption

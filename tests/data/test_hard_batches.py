"""data.hard_batches: the sampler of confusable pairs is a pure function of (seed, epoch, position), resumes
exactly, shards over ranks, and really puts images that share objects in the same batch."""

import json
from itertools import combinations

import pytest
import torch

from crossmatch.data.hard_batches import HardBatchSampler, caption_nouns, image_keys, item_keys
from crossmatch.data.loaders import EpochSampler
from crossmatch.engine.checkpoint import load_checkpoint
from crossmatch.runs import train as run_train
from tests import helpers


def tiny_example():
    """24 items (captions) of 12 images, 2 captions each. Groups (by key): "a" images 0-3, "b" images 4-7;
    images 8-11 have keys of their own (random fill). Batch size 4."""
    images = [i // 2 for i in range(24)]
    key_of_image = ["a"] * 4 + ["b"] * 4 + ["x8", "x9", "x10", "x11"]
    groups = [key_of_image[i] for i in images]
    return groups, list(images), images  # sub key = the image: no finer grouping


def indices(sampler) -> list[int]:
    return [k for k, _ in sampler]


def test_pure_function_of_seed_epoch_position_and_resume() -> None:
    groups, subs, images = tiny_example()
    a, b = HardBatchSampler(groups, subs, images, 4, seed=3), HardBatchSampler(groups, subs, images, 4, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    full = list(a)
    assert full == list(b) and sorted(indices(a)) == list(range(24))  # every item once per epoch
    for p in (0, 5, 8, 23):
        c = HardBatchSampler(groups, subs, images, 4, seed=3)
        c.set_epoch(2, start=p)
        assert list(c) == full[p:] and len(c) == 24 - p
    a.set_epoch(3)
    assert indices(a) != [k for k, _ in full]  # another epoch, another order
    other = HardBatchSampler(groups, subs, images, 4, seed=4)
    other.set_epoch(2)
    assert indices(other) != [k for k, _ in full]
    assert len({s for _, s in full}) == 24  # distinct augmentation seeds


def test_confusable_pairs_share_batches() -> None:
    """Hand-checked: group "a" has 8 items (images 0-3), exactly two batches of 4, and so has "b"; the random
    images 8-11 fill the last two batches. So every batch is one group, or only random images: pairs of
    different images of the same group share a batch 2 * 2 * (4 pairs of different images per batch) = 16 times
    per epoch. A random order (EpochSampler) gets 36 * 48 / 276 = 6.3 on average: 6 batches of 6 pairs = 36
    of the 276 item pairs, of which 48 are different images of one group (24 in each)."""
    groups, subs, images = tiny_example()
    hard, rand = HardBatchSampler(groups, subs, images, 4, seed=0), EpochSampler(24, seed=0)

    def shared(order: list[int]) -> int:
        batches = [order[i : i + 4] for i in range(0, 24, 4)]
        return sum(images[x] != images[y] and groups[x] == groups[y] for b in batches for x, y in combinations(b, 2))

    for epoch in range(20):
        hard.set_epoch(epoch)
        order = indices(hard)
        assert shared(order) == 16
        for b in (order[i : i + 4] for i in range(0, 24, 4)):
            assert len({groups[k] for k in b}) == 1 or all(groups[k].startswith("x") for k in b)
    random_counts = []
    for epoch in range(20):
        rand.set_epoch(epoch)
        random_counts.append(shared(indices(rand)))
    assert 3 < sum(random_counts) / 20 < 10  # about 6.3


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_are_disjoint_cover_and_keep_batches_whole(world_size: int) -> None:
    groups, subs, images = tiny_example()
    shards = [
        HardBatchSampler(groups, subs, images, 4, seed=1, rank=r, world_size=world_size) for r in range(world_size)
    ]
    for s in shards:
        s.set_epoch(5)
    streams = [list(s) for s in shards]
    per_rank = -(-24 // world_size)
    assert all(len(st) == per_rank for st in streams)
    seeds = [seed for st in streams for _, seed in st]
    assert len(set(seeds)) == len(seeds)  # disjoint positions of one global stream
    assert {k for st in streams for k, _ in st} == set(range(24))  # together they cover the epoch
    single = HardBatchSampler(groups, subs, images, 4, seed=1)
    single.set_epoch(5)
    batches = [tuple(sorted(single.epoch_order(5)[i : i + 4])) for i in range(0, 24, 4)]
    for st in streams:  # a rank's full batches are batches of the single-process epoch order
        for i in range(0, len(st) - len(st) % 4, 4):
            assert tuple(sorted(k for k, _ in st[i : i + 4])) in batches


def test_groups_come_from_shapes_objects_or_caption_nouns(shapes_root) -> None:
    from crossmatch.data.datasets import ImageCaptionDataset

    ds = ImageCaptionDataset(shapes_root, "train")
    keys = image_keys(ds)
    for rec, (group, sub) in zip(ds.images, keys, strict=True):
        assert group == tuple(sorted(o["shape"] for o in rec.objects))
        assert sub == (tuple(sorted(o["color"] for o in rec.objects)), tuple(sorted(o["size"] for o in rec.objects)))
    groups, _, image_of = item_keys(ds)
    assert len(groups) == len(ds.captions) and image_of == ds.txt_to_img
    assert caption_nouns("A brown dog is running on the green grass quickly") == {"dog", "grass"}


def test_real_captions_group_by_shared_nouns(tmp_path) -> None:
    from crossmatch.data.datasets import ImageCaptionDataset

    entries = [
        {"split": "train", "captions": ["a dog on the grass", "a brown dog runs", "the dog and a ball"]},
        {"split": "train", "captions": ["a black dog sleeping", "one dog"]},
        {"split": "train", "captions": ["a red car", "the car is parked"]},
        {"split": "train", "captions": ["it is red", "very small"]},
    ]
    ds = ImageCaptionDataset(helpers.write_karpathy(tmp_path, entries), "train")
    keys = [k for k, _ in image_keys(ds)]
    assert keys[0] == keys[1] == frozenset({"dog"})  # "grass", "ball" in 1 of 3 captions only
    assert keys[2] == frozenset({"car"})
    assert keys[3] == ("image", 3)  # no noun: alone


def _losses(run_dir) -> dict[int, float]:
    """step -> train loss, from metrics.jsonl (the cut run logs steps 1-2, then 3-4 after the resume)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if x.get("split") == "train" and "loss" in x}


@pytest.mark.slow
def test_trainer_resumed_mid_epoch_with_hard_batches_is_exact(shapes_root, tmp_path, monkeypatch) -> None:
    def cfg(*extra):
        return helpers.tiny_cfg(
            shapes_root, "data.hard_batches=true", "train.epochs=1", "train.max_steps_per_epoch=4",
            "train.log_every=1", "eval.batch_size=32", *extra,
        )  # fmt: skip

    run_train(cfg(), tmp_path / "full")
    helpers.train_interrupted(
        monkeypatch, lambda: run_train(cfg("checkpoint.every_steps=1"), tmp_path / "cut"), after=2
    )
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["trainer"]["step_in_epoch"] == 2
    run_train(cfg("checkpoint.every_steps=1"), tmp_path / "cut", resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert sorted(full) == [1, 2, 3, 4] and full == cut  # the same loss at every step, before and after the resume


def test_build_trainer_uses_the_hard_sampler_only_when_asked(shapes_root, tmp_path) -> None:
    from crossmatch.engine.distributed import init_distributed
    from crossmatch.runs import build_trainer

    dist = init_distributed("cpu")
    for flag, kind in (("true", HardBatchSampler), ("false", EpochSampler)):
        trainer, _ = build_trainer(helpers.tiny_cfg(shapes_root, f"data.hard_batches={flag}"), tmp_path / flag, dist)
        assert type(trainer.train_loader.sampler) is kind
        trainer.close()

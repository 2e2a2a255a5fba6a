"""`crossmatch demo`: the whole pipeline on the embedded shapes data, offline, in a few CPU minutes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crossmatch.cli.help import add_command

# VSE++ (small CNN + GRU) on 64 px shapes, the README's VSE++ row: epochs cut to 100 steps of 128 pairs.
# The first epoch sums the violations (warm-up) before hardest negatives take over; with 70-step epochs
# the model left the warm-up at val rsum 80 (146 with 100 steps) and was still at 98 after 3 epochs.
DEMO_OVERRIDES = [
    "model.name=vse_cnn",
    "train.epochs=4",
    "train.batch_size=128",
    "train.lr=5e-4",
    "train.max_steps_per_epoch=100",
    "train.lr_step_epochs=3",
    "loss.warmup_epochs=1",
]


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "demo",
        "generate the shapes data, train a model for a few minutes, evaluate it, draw a gallery",
        "crossmatch demo",
        "crossmatch demo --run-dir runs/demo2 train.epochs=2",
    )
    p.add_argument("--data", default="data/shapes", help="dataset folder (generated when missing)")
    p.add_argument("--run-dir", default="runs/demo", help="run folder (an unfinished demo run resumes)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for the demo run")


def run(args: argparse.Namespace) -> bool:
    if args.command != "demo":
        return False
    run_demo(args.data, args.run_dir, args.overrides)
    return True


def run_demo(data_root: str = "data/shapes", run_dir: str = "runs/demo", overrides: list[str] = ()) -> None:
    from crossmatch.cli.commands import run_evaluate, run_search
    from crossmatch.config import load_config
    from crossmatch.runs import open_split, train

    root = Path(data_root)
    if not (root / "dataset.json").is_file():
        from crossmatch.data.shapes import generate_shapes

        print(f"[1/4] generating the shapes dataset in {root} ...", flush=True)
        generate_shapes(root, progress=sys.stderr.isatty())
    else:
        print(f"[1/4] using the shapes dataset in {root}", flush=True)
    cfg = load_config(None, [*DEMO_OVERRIDES, f"data.root={root}", *overrides])
    print(f"[2/4] training {cfg.model['name']} into {run_dir} (progress in {run_dir}/train.log) ...", flush=True)
    train(cfg, run_dir, resume=True)
    best = Path(run_dir) / "checkpoints" / "best.pt"
    print(f"[3/4] evaluating {best} on the test split:", flush=True)
    run_evaluate(str(best), "test", str(Path(run_dir) / "test_metrics.json"), progress=False)
    # A test caption whose image has a twin: the gallery shows whether the model tells the pair apart.
    test = open_split(cfg, cfg.data.test_split)
    query = test.captions[test.images[test.twins[0][0]].caption_ids[0]] if test.twins else test.captions[0]
    gallery = Path(run_dir) / "gallery.png"
    print(f"[4/4] searching the test images for {query!r}:", flush=True)
    run_search(str(best), query=query, top_k=10, out=str(gallery))
    print(f"\nTensorBoard curves: tensorboard --logdir {Path(run_dir) / 'tb'}")
    print(f"Gallery: {gallery}   Metrics: {Path(run_dir) / 'test_metrics.json'}")

"""The `crossmatch` command line: data | train | evaluate | search | demo.

Errors in the user's input (CrossmatchError) print one line naming the culprit and exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from crossmatch.errors import CrossmatchError

# Modules that add commands: each has `add_parsers(sub, data_sub)` (argparse sub-parser groups of
# `crossmatch` and of `crossmatch data`) and `run(args) -> bool` (True when it handled the command).
# They are imported when the parser is built, so keep their top-level imports light (no torch).
COMMAND_MODULES: list[str] = [
    "crossmatch.cli.data_tools",
    "crossmatch.cli.features",
    "crossmatch.cli.index",
    "crossmatch.cli.export",
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossmatch", description="Image-text matching: train, evaluate, search.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="create datasets").add_subparsers(dest="data_command", required=True)
    shapes = data.add_parser("shapes", help="render the synthetic captioned-shapes dataset")
    shapes.add_argument("--out", required=True, help="output folder (dataset.json + images/)")
    shapes.add_argument("--train", type=int, default=10000, help="train images (default 10000)")
    shapes.add_argument("--val", type=int, default=1000, help="val images (default 1000)")
    shapes.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="YAML config (see configs/)")
    train.add_argument("--run-dir", default=None, help="output folder (default runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run dir")
    train.add_argument("--init-from", default=None, help="fine-tune: load matching weights of a .pt/.safetensors")
    train.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.epochs=5")

    ev = sub.add_parser("evaluate", help="retrieval metrics of a checkpoint on a split")
    ev.add_argument("checkpoint")
    ev.add_argument("--split", default="test", help="val | test | train, or a split name of the dataset")
    ev.add_argument("--json", default=None, help="also write the metrics dict to this JSON file")
    ev.add_argument(
        "--html", default=None, help="also write an HTML report of the worst-ranked text queries (stage-1 scores)"
    )
    ev.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. eval.rerank_k=64 eval.folds=5")

    se = sub.add_parser("search", help="rank a split's images for a sentence (or captions for an image)")
    se.add_argument("checkpoint")
    group = se.add_mutually_exclusive_group(required=True)
    group.add_argument("--query", help="sentence to search images for")
    group.add_argument("--image", help="image file to search captions for")
    se.add_argument("--top-k", type=int, default=10)
    se.add_argument("--out", default=None, help="write a gallery: FILE.png, or FILE.html (text queries)")
    se.add_argument(
        "--explain", action="store_true", help="SCAN: draw each word's attention over the top images (OUT_explain.png)"
    )
    se.add_argument("--split", default="test")
    se.add_argument("overrides", nargs="*", help="dotted config overrides")

    demo = sub.add_parser("demo", help="generate data, train VSE++ for a few minutes, evaluate, draw a gallery")
    demo.add_argument("--data", default="data/shapes", help="dataset folder (generated when missing)")
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("overrides", nargs="*", help="dotted config overrides for the demo run")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub, data)
    return p


def _run(args: argparse.Namespace) -> int:
    for name in COMMAND_MODULES:
        if importlib.import_module(name).run(args):
            return 0
    if args.command == "data" and args.data_command == "shapes":
        from crossmatch.data.shapes import generate_shapes

        path = generate_shapes(
            args.out, args.train, args.val, args.test, seed=args.seed, size=args.size, progress=sys.stderr.isatty()
        )
        print(f"wrote {path}")
    elif args.command == "train":
        from crossmatch.cli.train import run_train
        from crossmatch.config import load_config

        cfg = load_config(args.config, args.overrides)
        run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)
        state = run_train(cfg, run_dir, resume=args.resume, init_from=args.init_from)
        if os.environ.get("RANK", "0") == "0":
            print(
                f"done: best val {cfg.eval.metric} {state.best_metric:.2f} at epoch {state.best_epoch}; "
                f"checkpoints in {Path(run_dir) / 'checkpoints'}"
            )
    elif args.command == "evaluate":
        from crossmatch.cli.commands import run_evaluate

        run_evaluate(args.checkpoint, args.split, args.json, args.overrides, html_path=args.html)
    elif args.command == "search":
        from crossmatch.cli.commands import run_search

        run_search(
            args.checkpoint, args.query, args.image, args.top_k, args.out, args.split, args.overrides, args.explain
        )
    elif args.command == "demo":
        from crossmatch.cli.demo import run_demo

        run_demo(args.data, args.run_dir, args.overrides)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may follow options (`train CFG --run-dir X a.b=1`): argparse leaves those to us.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if "=" not in e or e.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return _run(args)
    except CrossmatchError as err:
        print(f"crossmatch: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crossmatch: interrupted", file=sys.stderr)
        return 130
    finally:
        logging.shutdown()


if __name__ == "__main__":
    sys.exit(main())

"""`crossmatch train CONFIG [--run-dir DIR] [--resume | --overwrite] [--init-from CKPT] [key=value ...]`.

The work is `crossmatch.runs.train`; this module parses and prints. Top-level imports stay light (no
torch): every command module is imported to build the parser.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from crossmatch.cli.help import add_command, add_device_option


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "train",
        "train a model from a YAML config",
        "crossmatch train configs/vse_shapes.yaml --run-dir runs/vse train.epochs=5",
        "torchrun --nproc_per_node=2 -m crossmatch train configs/scan_shapes_boxes.yaml --resume",
    )
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--run-dir", default=None, help="output folder (default: runs/<config name>)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run dir")
    mode.add_argument("--overwrite", action="store_true", help="delete the run dir's checkpoints and logs first")
    p.add_argument("--init-from", default=None, help="fine-tune: load matching weights of a .pt/.safetensors")
    add_device_option(p, default=None)  # None: train.device (auto)
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.epochs=5")


def run(args: argparse.Namespace) -> bool:
    if args.command != "train":
        return False
    from crossmatch.config import load_config
    from crossmatch.runs import train

    overrides = [*args.overrides, *([f"train.device={args.device}"] if args.device else [])]
    cfg = load_config(args.config, overrides)
    run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)
    state = train(cfg, run_dir, resume=args.resume, init_from=args.init_from, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":
        print(
            f"done: best val {cfg.eval.metric} {state.best_metric:.2f} at epoch {state.best_epoch}; "
            f"checkpoints in {Path(run_dir) / 'checkpoints'}"
        )
    return True

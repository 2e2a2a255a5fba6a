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
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="start again: the old run is set aside and deleted once the new run writes its first checkpoint",
    )
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
        print(run_summary(cfg, Path(run_dir), state))
    return True


def folder_size(path: Path) -> int:
    """Bytes of every file under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def draw_curves(cfg, run_dir: Path, title: str = "") -> Path | None:
    """`run_dir/curves.png` from its metrics.jsonl (train/val loss and the validation metric per epoch);
    None when the run logged no metrics.jsonl (`train.loggers` without jsonl)."""
    from crossmatch.search.curves import plot_curves

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    return plot_curves(metrics, run_dir / "curves.png", cfg.eval.metric, title or f"{cfg.model['name']}: {run_dir}")


def _val_row(row: dict, metric: str) -> str:
    keys = [k for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_mAP") if k in row]
    cells = [f"{metric} {row[metric]:.2f}"] + [f"{k} {row[k]:.2f}" for k in keys if k != metric]
    if "loss" in row:
        cells.append(f"loss {row['loss']:.4g}")
    return f"epoch {row['epoch']}: " + ", ".join(cells)


def run_summary(cfg, run_dir: Path, state) -> str:
    """How a run ended, as the demo ends: the best and last validation rows, where its files are (with the
    run folder's size), and the next commands. Draws curves.png."""
    from crossmatch.cli.demo import format_files

    metric, history = cfg.eval.metric, state.history
    best = next((r for r in history if r["epoch"] == state.best_epoch), None)
    lines = [f"trained {cfg.model['name']} for {state.epoch} epoch(s) into {run_dir}"]
    if best is not None:
        lines.append(f"  best val  {_val_row(best, metric)}")
    if history and history[-1] is not best:
        lines.append(f"  last val  {_val_row(history[-1], metric)}")
    curves = draw_curves(cfg, run_dir)
    ckpts = run_dir / "checkpoints"
    files = [
        ("best checkpoint (weights: evaluate, search, export)", ckpts / "best.pt"),
        ("last checkpoint (full state: --resume)", ckpts / "last.pt"),
        ("training log", run_dir / "train.log"),
        ("metrics (one JSON row per log)", run_dir / "metrics.jsonl"),
        ("TensorBoard logs", run_dir / "tb"),
        ("training curves", curves),
    ]
    lines.append(f"what the run wrote ({folder_size(run_dir) / 2**20:.1f} MB in {run_dir}):")
    lines.append(format_files([(what, p) for what, p in files if p is not None and p.exists()]))
    lines.append("next:")
    lines.append(f"  crossmatch evaluate {run_dir} --split test")
    lines.append(f'  crossmatch search {run_dir} --query "a caption to search the test images for"')
    if (run_dir / "tb").is_dir():
        lines.append(f"  tensorboard --logdir {run_dir / 'tb'}  (then http://localhost:6006)")
    return "\n".join(lines)

"""`crossmatch demo`: the whole pipeline on the embedded shapes data, offline, in a few CPU minutes.

Generate the data, train SCAN with box regions (Lee et al., ECCV 2018: the best model of the results
table, docs/results.md, for its budget), evaluate it on the 1000 test images / 5000 captions, and draw what it
learned: a search gallery, an HTML report of its worst-ranked test captions with the metrics on top, and
the training curves. `--time` prints the wall time of each phase (benchmarks/demo.py measures a fresh run).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

from crossmatch.cli.help import add_command
from crossmatch.progress import show_progress

# SCAN t-i LSE on box regions (configs/scan_shapes_boxes.yaml), made cheaper for a CPU demo: a narrower
# first conv (16 channels), 4 epochs of 60 steps of 128 pairs, lr 5e-4 (dropped x0.1 for the last epoch),
# the first epoch with the sum of violations before hardest negatives. Validation during training uses the
# first 250 val images (eval.max_images) and 4 batches of val loss; the test table uses the whole split.
# One loader worker: without it a step waited for data 23% of the time, with it 3% (with 2 workers 4%;
# benchmarks/train_throughput.py --recipes demo).
DEMO_OVERRIDES = [
    "model.name=scan_boxes",
    "model.cnn_channels=[16,32,64]",
    "model.embed_dim=256",
    "model.word_dim=300",
    "model.n_boxes=3",
    "train.epochs=4",
    "train.max_steps_per_epoch=60",
    "train.batch_size=128",
    "train.lr=5e-4",
    "train.lr_step_epochs=3",
    "train.log_every=10",
    "loss.warmup_epochs=1",
    "eval.max_images=250",
    "eval.loss_batches=4",
    "data.num_workers=1",
]
DEMO_TRAIN_IMAGES = 10000  # the default shapes train split; the test split is always the standard 1000 images


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "demo",
        "generate the shapes data, train SCAN for a few minutes, evaluate it, draw a gallery, a report and curves",
        "crossmatch demo",
        "crossmatch demo --time --run-dir runs/demo2 train.epochs=2",
    )
    p.add_argument("--data", default="data/shapes", help="dataset folder (generated when missing)")
    p.add_argument("--run-dir", default="runs/demo", help="run folder (an unfinished demo run resumes)")
    p.add_argument("--time", action="store_true", help="print the wall time and CPU time of each phase")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for the demo run")


def run(args: argparse.Namespace) -> bool:
    if args.command != "demo":
        return False
    phases = run_demo(args.data, args.run_dir, args.overrides)
    if args.time:
        print(format_phases(phases))
    return True


class Phases:
    """Wall and CPU seconds (this process and its finished children) of each named phase, and the load."""

    def __init__(self):
        self.rows: list[tuple[str, float, float, float]] = []  # (name, wall s, cpu s, 1-min load at the end)
        self._name, self._t0, self._cpu0 = "", 0.0, 0.0

    @staticmethod
    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def start(self, name: str, total: int, message: str) -> None:
        self.stop()
        self._name, self._t0, self._cpu0 = name, time.perf_counter(), self.cpu()
        print(f"[{len(self.rows) + 1}/{total}] {message}", flush=True)

    def stop(self) -> None:
        if self._name:
            self.rows.append((self._name, time.perf_counter() - self._t0, self.cpu() - self._cpu0, os.getloadavg()[0]))
            self._name = ""


def format_phases(phases: Phases) -> str:
    lines = [f"{'phase':<12}{'wall s':>9}{'CPU s':>9}{'load':>7}"]
    for name, wall, cpu, load in phases.rows:
        lines.append(f"{name:<12}{wall:9.1f}{cpu:9.1f}{load:7.1f}")
    wall, cpu = sum(r[1] for r in phases.rows), sum(r[2] for r in phases.rows)
    lines.append(f"{'total':<12}{wall:9.1f}{cpu:9.1f}   ({os.cpu_count()} CPUs; CPU s counts every core)")
    return "\n".join(lines)


def curves_title(cfg) -> str:
    """The title of the demo's curves.png: the model, its warm-up, and how many val images validation used
    (the split cut at `eval.max_images`: fewer than the cap on a small split)."""
    from crossmatch.runs import open_split

    n_val = len(open_split(cfg, cfg.data.val_split).first_images(cfg.eval.max_images).images)
    title = f"{cfg.model['name']} demo"
    if cfg.loss.warmup_epochs:
        title += f": {cfg.loss.warmup_epochs} warm-up epoch(s) sum every violation, then hardest negatives"
    return title + f"\nvalidation on {n_val} val images"


def format_files(files: list[tuple[str, object]]) -> str:
    """What a command wrote, one `  what:  path` line per file, the paths aligned."""
    width = max([54, *(len(what) + 3 for what, _ in files)])
    return "\n".join(f"  {what + ':':<{width}}{path}" for what, path in files)


def run_demo(data_root: str = "data/shapes", run_dir: str = "runs/demo", overrides: list[str] = ()) -> Phases:
    """The demo; returns the timing of each phase."""
    from crossmatch.cli.commands import run_evaluate, run_search
    from crossmatch.config import load_config
    from crossmatch.runs import open_split, train

    phases, steps = Phases(), 6
    root, run = Path(data_root), Path(run_dir)
    if not (root / "dataset.json").is_file():
        from crossmatch.data.shapes import generate_shapes

        phases.start("data", steps, f"generating the shapes dataset in {root} ...")
        generate_shapes(root, n_train=DEMO_TRAIN_IMAGES, progress=show_progress())
    else:
        phases.start("data", steps, f"using the shapes dataset in {root}")
    cfg = load_config(None, [*DEMO_OVERRIDES, f"data.root={root}", *overrides])
    phases.start("train", steps, f"training {cfg.model['name']} into {run} (progress in {run}/train.log) ...")
    train(cfg, run, resume=True)
    best = run / "checkpoints" / "best.pt"
    metrics_json, report = run / "test_metrics.json", run / "report.html"
    phases.start("evaluate", steps, f"evaluating {best} on the test split:")
    run_evaluate(str(best), "test", str(metrics_json), progress=False, html_path=str(report))
    # A test caption whose image has a twin: the gallery shows whether the model tells the pair apart.
    test = open_split(cfg, cfg.data.test_split)
    query = test.captions[test.images[test.twins[0][0]].caption_ids[0]] if test.twins else test.captions[0]
    gallery = run / "gallery.png"
    phases.start("search", steps, f"searching the test images for {query!r}:")
    run_search(str(best), query=query, top_k=10, out=str(gallery))
    phases.start("curves", steps, "drawing the training curves")
    from crossmatch.cli.train import draw_curves

    curves = draw_curves(cfg, run, curves_title(cfg))
    phases.start("files", steps, "what the demo wrote:")
    files = [
        ("test metrics", metrics_json),
        ("report (worst-ranked test captions, metrics on top)", report),
        ("search gallery", gallery),
        ("training curves (train/val loss, val rsum)", curves),
        ("checkpoint", best),
        ("training log", run / "train.log"),
    ]
    print(format_files(files))
    print(f"  open {report} in a browser; TensorBoard: tensorboard --logdir {run / 'tb'}  (then http://localhost:6006)")
    phases.stop()
    return phases

"""Exact gradient accumulation (GradCache) against the big batch it equals: time and peak memory of one
optimizer step of accum 4 x B against batch 4B, as ratios measured in the same run.

    python benchmarks/accumulation.py [--batch 32] [--accum 4] [--loss infonce] [--repeats 3] [--threads 2]

The model is the CPU shapes recipe's CLIP (configs/clip_shapes.yaml: open_clip ViT 64 px, 3 blocks, width
96; text 2 layers) on random inputs, trained through `Trainer.train_step`. Each setting runs in its own
process, so its peak memory is its own: on CUDA torch.cuda.max_memory_allocated, on CPU the growth of the
process's peak resident set over the built model and optimiser (what the step adds). Time: best of
--repeats steps after one warm-up. Prints the machine load (os.getloadavg()), which inflates timings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    import torch
    from torch.utils.data import DataLoader

    from crossmatch.config import LossConfig, RunConfig, load_config
    from crossmatch.engine.checkpoint import Checkpointer
    from crossmatch.engine.distributed import DistInfo
    from crossmatch.engine.logging import MetricLogger
    from crossmatch.engine.optim import create_optimizer, create_scheduler
    from crossmatch.engine.trainer import RunLoaders, RunSinks, Trainer
    from crossmatch.models import create_model
    from crossmatch.tasks import build_task

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe = load_config(ROOT / "configs" / "clip_shapes.yaml")
    model = create_model("clip", arch="", arch_config=recipe.model["arch_config"]).to(device)
    task = build_task(model, LossConfig(name=args.loss)).to(device)
    cfg = RunConfig()
    cfg.train.accum_steps = args.accum if args.mode == "accum" else 1
    micro = args.batch if args.mode == "accum" else args.batch * args.accum
    opt = create_optimizer(task, cfg.train)
    tmp = tempfile.mkdtemp()
    sinks = RunSinks(Checkpointer(tmp, 1, enabled=False), MetricLogger(tmp, enabled=False))
    loader = DataLoader(list(range(10 * args.batch * args.accum)), batch_size=micro)
    sched = create_scheduler(opt, cfg.train, 100)
    trainer = Trainer(task, opt, sched, RunLoaders(loader), None, sinks, cfg, DistInfo(device=device))
    n = args.batch * args.accum
    g = torch.Generator().manual_seed(1)
    size, ctx = model.preprocess["size"], model.context_length
    full = {
        "image": torch.randn(n, 3, size, size, generator=g),
        "input_ids": torch.randint(1, 49406, (n, ctx // 2), generator=g),
        "attention_mask": torch.ones(n, ctx // 2, dtype=torch.bool),
        "image_idx": torch.arange(n),
    }
    batches = [{k: v[i : i + micro] for k, v in full.items()} for i in range(0, n, micro)]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KB
    times = []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        trainer.train_step([dict(b) for b in batches])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"time_s": min(times[1:]), "peak_mb": peak / 2**20, "device": device.type}))


def run(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32, help="micro-batch B (the big batch is accum * B)")
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--loss", default="infonce", choices=["hinge", "infonce", "siglip"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(argparse.Namespace(**{**vars(args), "mode": args.child}))
        return
    load0 = os.getloadavg()[0]
    big, acc = run("big", args), run("accum", args)
    load1 = os.getloadavg()[0]
    n = args.batch * args.accum
    print(f"GradCache accumulation, {args.loss}, clip_shapes architecture, {big['device']}, {args.threads} threads")
    print(f"load average {load0:.1f} -> {load1:.1f}")
    print(f"{'':24}{'time/step':>12}{'peak memory':>14}")
    print(f"{'batch ' + str(n):24}{big['time_s']:>11.3f}s{big['peak_mb']:>11.0f} MB")
    print(f"{f'accum {args.accum} x {args.batch}':24}{acc['time_s']:>11.3f}s{acc['peak_mb']:>11.0f} MB")
    print(
        f"ratio accum / batch: time {acc['time_s'] / big['time_s']:.2f}x, "
        f"peak memory {acc['peak_mb'] / max(big['peak_mb'], 1e-9):.2f}x"
    )


if __name__ == "__main__":
    main()

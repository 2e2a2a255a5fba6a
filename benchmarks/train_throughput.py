"""What the training engine costs over a plain PyTorch loop, and how long a step waits for data.

    python benchmarks/train_throughput.py                        # tiny variants + every shipped shapes recipe
    python benchmarks/train_throughput.py --recipes tiny         # the tiny variants only (a minute)
    python benchmarks/train_throughput.py --recipes demo,vse --workers 0,2 --fixes

For each recipe (a shipped `configs/*_shapes*.yaml`, the `crossmatch demo` recipe, or a `tiny_*` variant):

1. **Engine overhead**: steps/s of `Trainer.train_epoch` (crossmatch.engine.trainer) against a bare loop,
   `zero_grad; task(batch); loss.backward(); clip_grad_norm_; optimizer.step(); scheduler.step()`, over the
   same task, optimizer, scheduler and the same pre-collated batches (no data cost in either), interleaved,
   best of `--repeats`. Goal: Trainer / bare <= 1.05.
2. **Data wait**: the Trainer over the real loader with each `--workers` count; the share of the epoch's wall
   time spent in `next(loader)` (the `data_wait` the Trainer logs), measured on a second epoch (workers
   persist across epochs, so their start-up is paid once per run). Goal: <= 5% with workers.
3. **Validation share** (`--validation`): one validation (retrieval on the val split + `eval.loss_batches` of
   val loss) against the training time of one epoch of the recipe (`steps_per_epoch` x the measured step).

`--fixes` times each engine fix against the code it replaced, in this run, interleaved, best of `--repeats`:
per-item seeding of augmentations, padded vs packed GRU, channels_last for the small CNN, persistent
workers, and SCAN scoring with captions sorted by length. Every line states the machine's load average:
this is a shared 2-core machine and load inflates every absolute figure (ratios far less).

Person-search recipes (`tipcb_*`) need identities, which the shapes data has not: they are left out.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# OpenMP threads sleep while they wait, as under the `crossmatch` command (crossmatch.cli.main); set before torch loads
if "--child-steps" not in sys.argv:  # a child runs under exactly the policy its parent gave it
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from crossmatch.config import load_config  # noqa: E402
from crossmatch.engine.distributed import init_distributed  # noqa: E402
from crossmatch.engine.trainer import autocast  # noqa: E402
from crossmatch.runs import build_trainer  # noqa: E402
from crossmatch.tensors import to_device  # noqa: E402

TINY = ["data.image_size=32", "train.batch_size=16", "eval.batch_size=16"]
# name -> (config file or None, overrides)
RECIPES: dict[str, tuple[str | None, list[str]]] = {
    "tiny_vse": (None, ["model.name=tiny_vse", *TINY]),
    "tiny_scan": (None, ["model.name=tiny_scan", *TINY]),
    "tiny_albef": (None, ["model.name=tiny_albef", *TINY]),
    "tiny_vilt": (None, ["model.name=tiny_vilt", *TINY]),
    "vse": ("configs/vse_shapes.yaml", []),
    "scan": ("configs/scan_shapes.yaml", []),
    "scan_boxes": ("configs/scan_shapes_boxes.yaml", []),
    "albef": ("configs/albef_shapes.yaml", []),
    "vilt": ("configs/vilt_shapes.yaml", []),
    "demo": ("demo", []),  # the recipe of `crossmatch demo`
}
GROUPS = {"tiny": [k for k in RECIPES if k.startswith("tiny_")], "all": list(RECIPES)}


def load() -> str:
    return "load " + "/".join(f"{x:.1f}" for x in os.getloadavg())


def recipe_config(name: str, data_root: str, extra: list[str]):
    path, overrides = RECIPES[name]
    if path == "demo":
        from crossmatch.cli.demo import DEMO_OVERRIDES

        path, overrides = None, DEMO_OVERRIDES
    return load_config(ROOT / path if path else None, [*overrides, f"data.root={data_root}", *extra])


class FixedBatches:
    """Stands in for the train loader: the same pre-collated batches every epoch, at no data cost."""

    def __init__(self, batches: list[dict], batch_size: int):
        self.batches, self.batch_size = batches, batch_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        pass

    @property
    def steps(self) -> int:
        return len(self.batches)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(trainer, batches: list[dict]) -> None:
    """The plain PyTorch loop over the trainer's own task, optimiser and schedule."""
    task, opt, sched, device = trainer.task, trainer.optimizer, trainer.scheduler, trainer.dist.device
    clip, precision = trainer.cfg.grad_clip, trainer.cfg.precision
    task.train()
    for batch in batches:
        batch = to_device(batch, device)
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            losses, _ = task(batch)
        loss = sum(losses.values())
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(task.parameters(), clip)
        opt.step()
        sched.step()
    sync(device)


def trainer_loop(trainer) -> None:
    trainer.state.step_in_epoch = 0
    trainer.train_epoch()
    sync(trainer.dist.device)


def best_times(
    fns: dict[str, Callable[[], object]], repeats: int, setup: Callable[[], None] | None = None
) -> dict[str, float]:
    """Best wall time of each function, interleaved (the order alternates between repeats), after one warm-up
    run of each; `setup` (untimed) runs before every call."""
    for fn in fns.values():
        if setup:
            setup()
        fn()
    best = dict.fromkeys(fns, float("inf"))
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            if setup:
                setup()
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
            CPU_TIMES[name] = min(CPU_TIMES.get(name, float("inf")), time.process_time() - c0)
    return best


CPU_TIMES: dict[str, float] = {}  # best CPU time (all threads) of each name timed by the last best_times


def snapshot(trainer) -> Callable[[], None]:
    """A setup that puts the task, optimiser and schedule back as they are now, so that every timed run
    trains the same weights from the same state (weights drifting over the runs change the speed)."""
    import copy

    state = copy.deepcopy(
        {
            "task": trainer.task.state_dict(),
            "opt": trainer.optimizer.state_dict(),
            "sched": trainer.scheduler.state_dict(),
        }
    )

    def restore() -> None:
        trainer.task.load_state_dict(state["task"])
        trainer.optimizer.load_state_dict(state["opt"])
        trainer.scheduler.load_state_dict(state["sched"])
        trainer.state.step_in_epoch = 0

    return restore


def build(name: str, data_root: str, run_dir: Path, extra: list[str], device: str):
    cfg = recipe_config(name, data_root, [f"train.device={device}", "train.max_steps_per_epoch=0", *extra])
    run_dir.mkdir(parents=True, exist_ok=True)
    return build_trainer(cfg, run_dir, init_distributed(cfg.train.device))[0]  # (trainer, resolved config)


def engine_overhead(name: str, args, run_dir: Path) -> tuple[float, float]:
    """(trainer s/step, bare s/step), best of args.repeats."""
    trainer = build(name, args.data, run_dir, ["data.num_workers=0"], args.device)
    loader = trainer.train_loader
    loader.sampler.set_epoch(0)
    it = iter(loader)
    batches = [next(it) for _ in range(args.steps)]
    trainer.train_loader = FixedBatches(batches, loader.batch_size)
    fns = {"trainer": lambda: trainer_loop(trainer), "bare": lambda: bare_loop(trainer, batches)}
    CPU_TIMES.clear()
    restore = snapshot(trainer)
    t = best_times(fns, args.repeats, restore)
    python = {}
    for key, fn in fns.items():  # time spent in Python outside torch's C++ ops: robust to the machine's load
        restore()
        python[key] = python_seconds(fn) / args.steps
    trainer.close()
    return t["trainer"] / args.steps, t["bare"] / args.steps, CPU_TIMES["trainer"] / CPU_TIMES["bare"], python


def python_seconds(fn: Callable[[], object]) -> float:
    """Seconds that `fn` spends in Python functions (cProfile's own time of every non-builtin function)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    return sum(v[2] for k, v in pstats.Stats(prof).stats.items() if k[0] != "~")


class Capture:
    """A metric logger that keeps the rows (the Trainer's `data_wait`, `steps_per_s`)."""

    def __init__(self):
        self.rows: list[dict] = []

    def log(self, metrics, step, split="train", epoch=None):
        self.rows.append(dict(metrics))

    def flush(self):
        pass

    def close(self):
        pass


def data_wait(name: str, workers: int, args, run_dir: Path) -> tuple[float, float]:
    """(share of the wall time waiting for data, steps/s) on the second of two epochs of args.steps steps."""
    trainer = build(name, args.data, run_dir, [f"data.num_workers={workers}"], args.device)
    trainer.cfg.max_steps_per_epoch = args.steps
    trainer.sinks.metric_logger = capture = Capture()
    for epoch in range(2):  # the first epoch starts the workers
        trainer.state.epoch, trainer.state.step_in_epoch = epoch, 0
        trainer_loop(trainer)
    row = capture.rows[-1]
    trainer.close()
    del trainer  # its persistent workers exit with the loader
    return row["data_wait"], row["steps_per_s"]


def validation_share(name: str, args, run_dir: Path, step_seconds: float) -> str:
    trainer = build(name, args.data, run_dir, ["data.num_workers=0"], args.device)
    t0 = time.perf_counter()
    trainer.evaluate()
    t_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.validation_loss()
    t_loss = time.perf_counter() - t0
    cap = recipe_config(name, args.data, []).train.max_steps_per_epoch  # the recipe's own epoch (build lifts it)
    steps = len(trainer.train_loader)
    steps = min(steps, cap) if cap > 0 else steps
    epoch = steps * step_seconds
    n_img = len(trainer.evaluator.data.image_loader.dataset)
    trainer.close()
    return (
        f"{name:<11} validation {t_eval:6.1f} s retrieval ({n_img} images) + {t_loss:5.1f} s val loss = "
        f"{100 * (t_eval + t_loss) / epoch:5.1f}% of a {steps}-step epoch ({epoch:.0f} s)   [{load()}]"
    )


# ---- the fixes, before against after ---------------------------------------------------------------
def fix_figures(args, run_dir: Path) -> list[str]:
    from torch.utils.data import DataLoader

    from crossmatch.data.loaders import EpochSampler, collate
    from crossmatch.models import scan_scoring

    trainer = build("demo", args.data, run_dir, ["data.num_workers=0"], args.device)
    pairs = trainer.train_loader.dataset
    lines = []

    # logged values: a host sync (float()) of every value at every step, as before, or only at logged steps
    loader = trainer.train_loader
    loader.sampler.set_epoch(0)
    it = iter(loader)
    trainer.train_loader = FixedBatches([next(it) for _ in range(args.steps)], loader.batch_size)
    real_step = trainer.train_step

    def synced_step(batches):
        logs = real_step(batches)
        return {k: float(v) for k, v in logs.items()}

    def loop(step) -> Callable[[], None]:
        def run() -> None:
            trainer.train_step = step
            trainer_loop(trainer)
            trainer.train_step = real_step

        return run

    t = best_times({"before": loop(synced_step), "after": loop(real_step)}, args.repeats, snapshot(trainer))
    lines.append(
        _ratio(
            f"Trainer, {trainer.dist.device}: float() of the logs every step -> at logged steps, ms/step",
            t,
            1e3 / args.steps,
        )
    )
    trainer.train_loader = loader

    def item_old(i: int) -> dict:  # before: torch.manual_seed, which also (lazily) seeds every CUDA device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 + i)
            cap = pairs.captions[i]
            return {**pairs.images[cap["image_idx"]], **cap}

    n = 256
    t = best_times(
        {
            "before": lambda: [item_old(i) for i in range(n)],
            "after": lambda: [pairs[(i, 1000 + i)] for i in range(n)],
        },
        args.repeats,
    )
    lines.append(_ratio("per-item seeding (torch.manual_seed -> CPU generator), ms per item", t, 1e3 / n))

    model, device = trainer.model, trainer.dist.device
    batch = to_device(next(iter(trainer.train_loader)), device)
    tower = model.text_tower

    def gru(fn) -> Callable[[], None]:
        def run() -> None:
            words, sentence = fn(batch["input_ids"], batch["attention_mask"])
            (words.sum() + sentence.sum()).backward()
            sync(device)

        return run

    def padded_unidirectional(ids, mask):  # the alternative measured, not adopted: a causal GRU on the padding
        lengths = mask.sum(1).clamp(min=1)
        n = int(lengths.max())
        words, _ = tower.gru(tower.embed(ids[:, :n]))  # (B, n, D)
        sentence = words[torch.arange(len(ids)), lengths - 1]  # (B, D)
        real = torch.arange(n)[None, :] < lengths[:, None]  # (B, n)
        return words.masked_fill(~real[..., None], 0.0), sentence

    t = best_times({"before": gru(tower.forward), "after": gru(padded_unidirectional)}, args.repeats)
    n = batch["input_ids"].shape[0]
    lines.append(_ratio(f"GRU fwd+bwd, batch {n}: packed (kept) -> padded forward-only (not adopted), ms", t))

    cnn = model.image_tower
    x = batch["image"]

    def cnn_step(fn) -> Callable[[], None]:
        return lambda: (fn(x).sum().backward(), sync(device))

    t = best_times({"before": cnn_step(cnn.body), "after": cnn_step(cnn)}, args.repeats)
    lines.append(_ratio(f"SmallCNN fwd+bwd {tuple(x.shape)}: NCHW -> channels_last input, ms", t))

    def first_batch(persistent: bool) -> Callable[[], None]:
        bs = trainer.train_loader.batch_size
        loader = DataLoader(
            pairs,
            bs,
            sampler=EpochSampler(len(pairs)),
            collate_fn=collate,
            num_workers=2,
            persistent_workers=persistent,
        )

        def run() -> None:
            for epoch in range(2):
                loader.sampler.set_epoch(epoch)
                next(iter(loader))

        return run

    t = best_times({"before": first_batch(False), "after": first_batch(True)}, args.repeats)
    lines.append(_ratio("2 workers: first batch of 2 epochs, fresh -> persistent workers, ms", t))

    img = torch.nn.functional.normalize(torch.randn(args.scan_images, 4, 256, device=device), dim=-1)
    n_txt = 5 * args.scan_images
    cap = torch.nn.functional.normalize(torch.randn(n_txt, 32, 256, device=device), dim=-1)
    lens = torch.randint(9, 33, (n_txt,), device=device)  # like shapes captions (9-40 words, mean 19)

    def scan(sort: bool) -> Callable[[], None]:
        def run() -> None:
            scan_scoring.SORT_CAPTIONS = sort
            with torch.no_grad():
                scan_scoring.scan_similarity(img, cap, lens)
            sync(device)
            scan_scoring.SORT_CAPTIONS = True

        return run

    t = best_times({"before": scan(False), "after": scan(True)}, args.repeats)
    lines.append(_ratio(f"SCAN scoring {args.scan_images}x{n_txt} (R=4, W=32): padded -> length-sorted chunks, ms", t))
    trainer.close()
    return lines


def steps_child(args) -> None:
    """In a fresh process (OpenMP reads its wait policy when torch loads): s/step of the demo's train_step."""
    import json

    trainer = build(args.child_recipe, args.data, Path(tempfile.mkdtemp()), ["data.num_workers=0"], "cpu")
    loader = trainer.train_loader
    loader.sampler.set_epoch(0)
    it = iter(loader)
    batches = [next(it) for _ in range(args.steps)]
    trainer.train_step(batches[:1])  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        trainer.train_step([b])
    print(json.dumps({"step_s": (time.perf_counter() - t0) / args.steps, "threads": torch.get_num_threads()}))


def openmp_figures(args) -> list[str]:
    """A training step with OpenMP threads that spin while they wait (libgomp's default) against threads that
    sleep (OMP_WAIT_POLICY=PASSIVE, what the crossmatch command sets), each in fresh processes, interleaved."""
    import json
    import subprocess

    best: dict[str, float] = {}
    for _ in range(args.repeats):
        for policy in ("ACTIVE", "PASSIVE", "default"):
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy != "default":
                env["OMP_WAIT_POLICY"] = policy
            cmd = [sys.executable, __file__, "--child-steps", "--recipes", "demo", "--data", args.data]
            cmd += ["--steps", str(args.steps)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            best[policy] = min(best.get(policy, float("inf")), json.loads(out.splitlines()[-1])["step_s"])
    return [
        f"demo train_step, OpenMP wait policy: default {best['default']:.3f} s, ACTIVE {best['ACTIVE']:.3f} s, "
        f"PASSIVE {best['PASSIVE']:.3f} s (default / PASSIVE = {best['default'] / best['PASSIVE']:.2f}x)   [{load()}]"
    ]


def _ratio(what: str, t: dict[str, float], unit: float = 1e3) -> str:
    return (
        f"{what}: {t['before'] * unit:.1f} -> {t['after'] * unit:.1f} "
        f"({t['before'] / t['after']:.2f}x faster)   [{load()}]"
    )


def ensure_data(root: str | None, tmp: Path) -> str:
    if root and (Path(root) / "dataset.json").is_file():
        return root
    from crossmatch.data.shapes import generate_shapes

    out = tmp / "shapes"
    print(f"generating a small shapes dataset in {out} (2000/200/200 images; pass --data for the real one)")
    generate_shapes(out, n_train=2000, n_val=200, n_test=200)
    return str(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="all", help=f"comma-separated: {', '.join(RECIPES)}, tiny, all")
    p.add_argument("--data", default="data/shapes", help="shapes dataset (a small one is generated if missing)")
    p.add_argument("--steps", type=int, default=8, help="training steps per timed epoch")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (the best is kept)")
    p.add_argument("--workers", default="0,2", help="loader worker counts for the data-wait share")
    p.add_argument("--no-overhead", action="store_true", help="skip Trainer vs bare loop")
    p.add_argument("--validation", action="store_true", help="also the validation share of an epoch")
    p.add_argument("--fixes", action="store_true", help="also time each engine fix against what it replaced")
    p.add_argument("--scan-images", type=int, default=250, help="images of the SCAN scoring fix (x5 captions)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--openmp", action="store_true", help="also a demo step with spinning vs sleeping OpenMP threads")
    p.add_argument("--child-steps", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_steps:
        args.child_recipe = args.recipes
        steps_child(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for part in args.recipes.split(",") for n in GROUPS.get(part, [part])]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    workers = [int(w) for w in args.workers.split(",") if w != ""]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, device {args.device}")
    print(f"{args.steps} steps per timed epoch, best of {args.repeats}; start {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        args.data = ensure_data(args.data, tmp)
        for name in names:
            step = None
            if not args.no_overhead:
                trainer_s, bare_s, cpu_ratio, py = engine_overhead(name, args, tmp / f"{name}-overhead")
                step = trainer_s
                extra = 100 * (py["trainer"] - py["bare"]) / bare_s
                print(
                    f"{name:<11} Trainer {1 / trainer_s:7.2f} steps/s, bare loop {1 / bare_s:7.2f} steps/s: "
                    f"Trainer / bare = {trainer_s / bare_s:.3f} in wall time, {cpu_ratio:.3f} in CPU time; Python "
                    f"outside torch ops {1e3 * py['trainer']:.1f} vs {1e3 * py['bare']:.1f} ms/step "
                    f"({extra:+.1f}% of a bare step)   [{load()}]",
                    flush=True,
                )
            for w in workers:
                share, steps_per_s = data_wait(name, w, args, tmp / f"{name}-w{w}")
                print(
                    f"{name:<11} {w} workers: {steps_per_s:7.2f} steps/s, waiting for data {100 * share:5.1f}% of "
                    f"the epoch   [{load()}]",
                    flush=True,
                )
                step = step or 1 / steps_per_s
            if args.validation and step:
                print(validation_share(name, args, tmp / f"{name}-val", step), flush=True)
        if args.fixes:
            print("fixes (before -> after, same run):")
            for line in fix_figures(args, tmp / "fixes"):
                print("  " + line, flush=True)
        if args.openmp:
            for line in openmp_figures(args):
                print(line, flush=True)


if __name__ == "__main__":
    main()

"""What checkpoint integrity costs: `atomic_save` (sha256 of the payload, then `atomic_write`: fsync, rename)
against `atomic_write` of a plain `torch.save` (the durability alone) and against `torch.save`; and
`load_checkpoint` (CRC-32 of every zip record, the sha256 again) against `torch.load(weights_only=True)`.

    python benchmarks/checkpoint_integrity.py            # a 256 MB state: model + two Adam moments
    python benchmarks/checkpoint_integrity.py --mb 1024

Every figure is the best of `--repeats` runs, plain and checked interleaved in the same process on the same
state, written to the same folder (so the page cache treats both alike); the machine load is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from crossmatch.engine.checkpoint import atomic_save, load_checkpoint  # noqa: E402
from crossmatch.files import atomic_write  # noqa: E402


def make_state(mb: int) -> dict:
    """A checkpoint-shaped dict whose tensors total `mb` MB: weights, and Adam's two moments of them."""
    n = mb * 2**20 // 4 // 3 // 16  # float32 elements per tensor, 16 tensors per group
    g = torch.Generator().manual_seed(0)
    model = {f"layer{i}.weight": torch.randn(n, generator=g) for i in range(16)}
    moments = {i: {"exp_avg": torch.randn(n, generator=g), "exp_avg_sq": torch.rand(n, generator=g)} for i in range(16)}
    return {"model": model, "optimizer": {"state": moments, "param_groups": [{"lr": 1e-3}]}, "trainer": {"epoch": 1}}


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    state = make_state(args.mb)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        plain, durable, checked = Path(tmp) / "plain.pt", Path(tmp) / "durable.pt", Path(tmp) / "checked.pt"
        save_plain = best_of(lambda: torch.save(state, plain), args.repeats)
        save_durable = best_of(lambda: atomic_write(durable, lambda f: torch.save(state, f)), args.repeats)
        save_checked = best_of(lambda: atomic_save(state, checked), args.repeats)
        load_plain = best_of(lambda: torch.load(plain, map_location="cpu", weights_only=True), args.repeats)
        load_checked = best_of(lambda: load_checkpoint(checked), args.repeats)
    threads = f"{torch.get_num_threads()} torch thread, {os.cpu_count()} CPUs"
    print(f"state {args.mb} MB, best of {args.repeats}, {threads}, load average {os.getloadavg()[0]:.2f}")
    print(
        f"save: torch.save {save_plain:.3f} s, atomic_write(torch.save) {save_durable:.3f} s, "
        f"atomic_save {save_checked:.3f} s ({save_checked / save_durable:.2f}x the durable write)"
    )
    ratio = load_checked / load_plain
    print(f"load: torch.load {load_plain:.3f} s, load_checkpoint {load_checked:.3f} s ({ratio:.2f}x)")


if __name__ == "__main__":
    main()

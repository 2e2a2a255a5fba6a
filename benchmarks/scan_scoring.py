"""Benchmark SCAN's batched scoring (Lee et al., ECCV 2018) against its speed limit and the reference loop.

    python benchmarks/scan_scoring.py                 # 100 x 500 + the 128 x 128 training step (~1-2 min)
    python benchmarks/scan_scoring.py --full          # adds Flickr30K-sized 1000 x 5000, t2i and i2t (minutes)
    python benchmarks/scan_scoring.py --no-loop --phases   # where the time goes, pass by pass, on one chunk

Every figure is the best of `--repeats` runs, and every ratio compares timings taken in the same process,
interleaved, on the same inputs: random l2-normalised features, R=36 regions, D=1024, W=16 padded words,
caption lengths 8-16. "GEMM" is the unavoidable work, (n_img*R, D) @ (D, n_txt*W) into a reused buffer
(done in column blocks at 1000 x 5000, whose full output would be 11.5 GB). "loop" is the reference
formulation: one caption at a time, attended D-dim vectors, float32.

Legend: R regions, W words, D width.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from crossmatch.models.scan_scoring import scan_similarity  # noqa: E402

R, W, D = 36, 16, 1024


def make_inputs(n_img: int, n_txt: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Random l2-normalised regions (n_img, R, D), words (n_txt, W, D), lengths in [8, 16]."""
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_img, R, D, generator=g), dim=-1)
    captions = F.normalize(torch.randn(n_txt, W, D, generator=g), dim=-1)
    cap_lens = torch.randint(8, W + 1, (n_txt,), generator=g)
    return images, captions, cap_lens


def gemm_fn(images: Tensor, captions: Tensor, max_out_elems: int = 1 << 28) -> Callable[[], None]:
    """The one GEMM (n_img*R, D) @ (D, n_txt*W), into a reused buffer (column blocks if it is huge)."""
    a = images.reshape(-1, D)  # (n_img*R, D)
    b = captions.reshape(-1, D)  # (n_txt*W, D)
    cols = max(1, min(b.shape[0], max_out_elems // a.shape[0]))
    out = torch.empty(a.shape[0], cols)  # (n_img*R, cols)

    def run() -> None:
        for j in range(0, b.shape[0], cols):
            blk = b[j : j + cols]
            torch.mm(a, blk.t(), out=out[:, : blk.shape[0]])

    return run


def loop_similarity(images: Tensor, captions: Tensor, cap_lens: Tensor, direction: str) -> Tensor:
    """The reference formulation (clipped_l2norm, LogSumExp): a Python loop over captions, in float32."""
    lam, lam_lse = (9.0, 6.0) if direction == "t2i" else (4.0, 5.0)
    n_img = images.shape[0]
    cols = []
    for t in range(captions.shape[0]):
        cap = captions[t, : int(cap_lens[t])].unsqueeze(0).expand(n_img, -1, -1)  # (n_img, L, D)
        query, context = (cap, images) if direction == "t2i" else (images, cap)
        attn = F.leaky_relu(torch.bmm(context, query.transpose(1, 2)), 0.1)  # (n_img, Lc, Lq)
        attn = attn / (attn.norm(dim=2, keepdim=True) + 1e-8)
        attn = torch.softmax(attn * lam, dim=1)
        attended = torch.bmm(attn.transpose(1, 2), context)  # (n_img, Lq, D)
        rel = (query * attended).sum(-1) / (query.norm(dim=-1) * attended.norm(dim=-1)).clamp(min=1e-8)
        cols.append(torch.logsumexp(rel * lam_lse, dim=1) / lam_lse)  # (n_img,)
    return torch.stack(cols, dim=1)  # (n_img, n_txt)


def best_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> dict[str, float]:
    """Best wall time of each function, run interleaved `repeats` times (after one warm-up each)."""
    for fn in fns.values() if warmup else ():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def scoring_figures(n_img: int, n_txt: int, repeats: int, with_loop: bool) -> list[tuple[str, float, str]]:
    images, captions, cap_lens = make_inputs(n_img, n_txt)
    fns: dict[str, Callable[[], object]] = {"gemm": gemm_fn(images, captions)}
    loops: dict[str, Callable[[], object]] = {}
    for d in ("t2i", "i2t"):
        lam = {} if d == "t2i" else {"lambda_softmax": 4.0, "lambda_lse": 5.0}
        fns[d] = lambda d=d, lam=lam: scan_similarity(images, captions, cap_lens, direction=d, **lam)
        loops[f"loop {d}"] = lambda d=d: loop_similarity(images, captions, cap_lens, d)
    with torch.no_grad():
        t = best_times(fns, repeats)
        if with_loop:  # tens of seconds each: one run is enough to see the ratio
            t |= best_times(loops, 1, warmup=False)
    rows = [(f"GEMM ({n_img * R}x{D}) @ ({D}x{n_txt * W})", t["gemm"], "1.00 (limit)")]
    for d in ("t2i", "i2t"):
        rows.append((f"scan_similarity {d}", t[d], f"{t[d] / t['gemm']:.2f} x GEMM"))
        if with_loop:
            rows.append((f"per-caption loop {d} (1 run)", t[f"loop {d}"], f"ours {t[f'loop {d}'] / t[d]:.1f}x faster"))
    return rows


def training_figures(batch: int, repeats: int) -> list[tuple[str, float, str]]:
    images, captions, cap_lens = make_inputs(batch, batch, seed=1)

    def step(fn: Callable[..., Tensor]) -> Callable[[], None]:
        def run() -> None:
            im = images.clone().requires_grad_()
            cap = captions.clone().requires_grad_()
            fn(im, cap, cap_lens, "t2i").sum().backward()

        return run

    t = best_times({"ours": step(lambda *a: scan_similarity(*a[:3], direction=a[3]))}, repeats)
    t |= best_times({"loop": step(loop_similarity)}, 1, warmup=False)  # seconds per run: one is enough
    return [
        (f"train fwd+bwd {batch}x{batch} ours", t["ours"], ""),
        (f"train fwd+bwd {batch}x{batch} loop (1 run)", t["loop"], f"ours {t['loop'] / t['ours']:.1f}x faster"),
    ]


def phase_figures(repeats: int) -> list[tuple[str, float, str]]:
    """Time each pass of the default no-grad path on one default-sized t2i chunk (clipped_l2norm, LogSumExp)."""
    from crossmatch.models.scan_scoring import _chunk_sizes

    C, Q = _chunk_sizes(1000, R, 5000, W, None, None)  # images, captions per chunk
    images, captions, _ = make_inputs(C, Q)
    ctx, qry = images.reshape(-1, D), captions.reshape(-1, D)  # (C*R, D), (Q*W, D)
    gram = torch.bmm(images, images.transpose(1, 2))  # (C, R, R)
    s = torch.empty(C, R, Q, W)
    e = torch.empty(C, R, Q, W)
    scale = torch.rand(C, R, Q, 1)
    phases = {
        "GEMM": lambda: torch.mm(ctx, qry.t(), out=s.view(C * R, Q * W)),
        "leaky_relu": lambda: torch.ops.aten.leaky_relu.out(s, 0.1, out=e),
        "l2 norm over W": lambda: torch.linalg.vector_norm(e, dim=-1, keepdim=True),
        "scale": lambda: e.mul_(scale),
        "exp2": lambda: e.clamp_(max=1).exp2_(),
        "sum over R (z)": lambda: e.sum(dim=1),
        "dot: mul_ + sum over R": lambda: s.mul_(e).sum(dim=1),
        "Gram bmm": lambda: torch.bmm(gram, e.view(C, R, Q * W), out=s.view(C, R, Q * W)),
        "quad: mul_ + sum over R": lambda: s.mul_(e).sum(dim=1),
    }
    t = best_times(phases, repeats)
    total = sum(t.values())
    rows = [(f"phase {k} ({C}x{R}x{Q}x{W} chunk)", v, f"{v / t['GEMM']:.3f} x GEMM") for k, v in t.items()]
    return rows + [("phases total", total, f"{total / t['GEMM']:.2f} x GEMM")]


def full_child(direction: str, repeats: int) -> None:
    """Runs in a fresh process: 1000 x 5000 in one direction; prints JSON with best times and peak RSS growth.

    Ours runs first, so the peak RSS it leaves is its own (the GEMM's 1 GiB block buffer comes after).
    """
    images, captions, cap_lens = make_inputs(1000, 5000)
    lam = {} if direction == "t2i" else {"lambda_softmax": 4.0, "lambda_lse": 5.0}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, inputs included
    with torch.no_grad():
        ours = lambda: scan_similarity(images, captions, cap_lens, direction=direction, **lam)  # noqa: E731
        t_ours = best_times({"ours": ours}, 1, warmup=False)["ours"]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fns = {"gemm": gemm_fn(images, captions), "ours": ours} if repeats > 1 else {"gemm": gemm_fn(images, captions)}
        t = {"ours": t_ours} | best_times(fns, max(1, repeats - 1), warmup=False)
    out = {
        "gemm": t["gemm"],
        "ours": min(t_ours, t["ours"]),
        "growth_mib": (peak - rss0) / 1024,
        "peak_mib": peak / 1024,
    }
    print(json.dumps(out))


def full_figures(repeats: int) -> list[tuple[str, float, str]]:
    rows = []
    for d in ("t2i", "i2t"):
        run = [sys.executable, __file__, "--child", d, "--repeats", str(repeats)]
        res = json.loads(subprocess.run(run, check=True, capture_output=True, text=True).stdout)
        rows.append(("GEMM (36000x1024) @ (1024x80000)", res["gemm"], "1.00 (limit)"))
        rows.append(
            (
                f"scan_similarity {d} 1000x5000",
                res["ours"],
                f"{res['ours'] / res['gemm']:.2f} x GEMM, peak RSS +{res['growth_mib']:.0f} MiB "
                f"over the inputs ({res['peak_mib']:.0f} MiB total)",
            )
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-img", type=int, default=100)
    p.add_argument("--n-txt", type=int, default=500)
    p.add_argument("--batch", type=int, default=128, help="training batch (images = captions)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--full", action="store_true", help="also score 1000 x 5000 (Flickr30K test), minutes")
    p.add_argument("--full-repeats", type=int, default=2, help="runs of each 1000 x 5000 timing (~1 min each)")
    p.add_argument("--phases", action="store_true", help="also time each pass on one default chunk")
    p.add_argument("--no-loop", action="store_true", help="skip the slow per-caption loop")
    p.add_argument("--child", choices=["t2i", "i2t"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        full_child(args.child, args.repeats)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}")
    rows = scoring_figures(args.n_img, args.n_txt, args.repeats, not args.no_loop)
    rows += training_figures(args.batch, args.repeats)
    if args.phases:
        rows += phase_figures(args.repeats * 4)
    if args.full:
        rows += full_figures(args.full_repeats)
    width = max(len(r[0]) for r in rows)
    for name, seconds, note in rows:
        print(f"{name:<{width}}  {seconds * 1e3:10.1f} ms  {note}")


if __name__ == "__main__":
    main()

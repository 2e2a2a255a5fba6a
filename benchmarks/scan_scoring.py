"""Benchmark SCAN's batched scoring (Lee et al., ECCV 2018) against its speed limit and the reference loop.

    python benchmarks/scan_scoring.py                 # 100 x 500 + the 128 x 128 training step (~1-2 min)
    python benchmarks/scan_scoring.py --full          # adds Flickr30K-sized 1000 x 5000, t2i and i2t (minutes)
    python benchmarks/scan_scoring.py --full --repeats 2 --no-loop   # best of 2 at full size, progress on stderr
    python benchmarks/scan_scoring.py --no-loop --phases   # where the time goes, pass by pass, on one chunk
    python benchmarks/scan_scoring.py --bf16          # also the bf16-GEMM path: its speed and its error vs fp32
    python benchmarks/scan_scoring.py --device cuda   # the same on a GPU (benchmarks/gpu_check.sh)

Every figure is the best of `--repeats` runs (default 5 at 100 x 500, 1 at 1000 x 5000, where one run of
each kind takes about a minute on 2 cores), and every ratio compares timings taken in the same run on the
same inputs: random l2-normalised features, R=36 regions, D=1024, W=16 padded words, caption lengths 8-16.
"GEMM" is the unavoidable work, (n_img*R, D) @ (D, n_txt*W) into a reused buffer (done in column blocks at
1000 x 5000, whose full output would be 11.5 GB). Since captions are scored in length-sorted chunks cut to
their longest caption, scan_similarity multiplies fewer columns than that padded GEMM; "trimmed GEMM" is
the same GEMM over the columns it does multiply, so both ratios are printed. "loop" is the reference
formulation: one caption at a time, attended D-dim vectors, float32. At 1000 x 5000 each timing runs in a
fresh process (GEMM, t2i, i2t in turn, `--repeats` rounds), so that peak RSS is each one's own.

Legend: R regions, W words, D width.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# OpenMP threads sleep while they wait, as under the `crossmatch` command (crossmatch.cli.main); set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from crossmatch.models.scan_scoring import scan_similarity  # noqa: E402

R, W, D = 36, 16, 1024
DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def make_inputs(n_img: int, n_txt: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Random l2-normalised regions (n_img, R, D), words (n_txt, W, D), lengths in [8, 16], on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_img, R, D, generator=g), dim=-1)
    captions = F.normalize(torch.randn(n_txt, W, D, generator=g), dim=-1)
    cap_lens = torch.randint(8, W + 1, (n_txt,), generator=g)
    return images.to(DEVICE), captions.to(DEVICE), cap_lens.to(DEVICE)


def trimmed_columns(cap_lens: Tensor, n_img: int, direction: str) -> int:
    """Caption-side GEMM columns scan_similarity multiplies with its default chunks: each length-sorted chunk
    cut to its longest caption (all W when the captions fit one chunk)."""
    from crossmatch.models.scan_scoring import _chunk_sizes

    n_txt = len(cap_lens)
    if direction == "t2i":
        step = _chunk_sizes(n_img, R, n_txt, W, None, None)[1]
    else:
        step = _chunk_sizes(n_txt, W, n_img, R, None, None)[0]
    if step >= n_txt:
        return n_txt * W
    lens = cap_lens.sort().values.tolist()
    return sum(len(lens[k : k + step]) * lens[min(k + step, n_txt) - 1] for k in range(0, n_txt, step))


GEMM_BLOCKS = ((1024, 4096), (4096, 1024))  # output blocks of the GEMM limit: its faster one is kept


def gemm_fn(images: Tensor, captions: Tensor, cols: int | None = None, block: tuple[int, int] = GEMM_BLOCKS[0]):
    """The one GEMM (n_img*R, D) @ (D, n_txt*W) in (rows x cols) output blocks of a reused 16 MiB buffer,
    the fastest way we found to run it here (one huge output, 11.5 GB at 1000 x 5000, is bound by writing it
    to memory: 25-40% slower); with `cols`, only the first `cols` caption rows (the trimmed GEMM)."""
    a = images.reshape(-1, D)  # (n_img*R, D)
    b = captions.reshape(-1, D)[:cols]  # (cols, D)
    rb, cb = block
    out = torch.empty(rb, cb, device=DEVICE)  # (rb, cb)

    def run() -> None:
        for i in range(0, a.shape[0], rb):
            ai = a[i : i + rb]
            for j in range(0, b.shape[0], cb):
                bj = b[j : j + cb]
                torch.mm(ai, bj.t(), out=out[: ai.shape[0], : bj.shape[0]])
        sync()

    return run


def gemm_limit(images: Tensor, captions: Tensor, cols: int | None = None) -> dict[str, Callable[[], None]]:
    """The GEMM in each block shape of GEMM_BLOCKS (time them all; the fastest is the limit)."""
    return {f"gemm {r}x{c}": gemm_fn(images, captions, cols, (r, c)) for r, c in GEMM_BLOCKS}


def fastest(t: dict[str, float], prefix: str) -> float:
    return min(v for k, v in t.items() if k.startswith(prefix))


def loop_similarity(images: Tensor, captions: Tensor, cap_lens: Tensor, direction: str) -> Tensor:
    """The reference formulation (clipped_l2norm, LogSumExp): a Python loop over captions, in float32."""
    lam, lam_lse = (9.0, 6.0) if direction == "t2i" else (4.0, 5.0)
    n_img = images.shape[0]
    cols = []
    for t, n in enumerate(cap_lens.tolist()):
        cap = captions[t, :n].unsqueeze(0).expand(n_img, -1, -1)  # (n_img, L, D)
        query, context = (cap, images) if direction == "t2i" else (images, cap)
        attn = F.leaky_relu(torch.bmm(context, query.transpose(1, 2)), 0.1)  # (n_img, Lc, Lq)
        attn = attn / (attn.norm(dim=2, keepdim=True) + 1e-8)
        attn = torch.softmax(attn * lam, dim=1)
        attended = torch.bmm(attn.transpose(1, 2), context)  # (n_img, Lq, D)
        rel = (query * attended).sum(-1) / (query.norm(dim=-1) * attended.norm(dim=-1)).clamp(min=1e-8)
        cols.append(torch.logsumexp(rel * lam_lse, dim=1) / lam_lse)  # (n_img,)
    out = torch.stack(cols, dim=1)  # (n_img, n_txt)
    sync()
    return out


def ours(images: Tensor, captions: Tensor, cap_lens: Tensor, direction: str, gemm_dtype=None) -> Callable[[], Tensor]:
    lam = {} if direction == "t2i" else {"lambda_softmax": 4.0, "lambda_lse": 5.0}

    def run() -> Tensor:
        out = scan_similarity(images, captions, cap_lens, direction=direction, gemm_dtype=gemm_dtype, **lam)
        sync()
        return out

    return run


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
    fns: dict[str, Callable[[], object]] = dict(gemm_limit(images, captions))
    loops: dict[str, Callable[[], object]] = {}
    for d in ("t2i", "i2t"):
        fns[d] = ours(images, captions, cap_lens, d)
        loops[f"loop {d}"] = lambda d=d: loop_similarity(images, captions, cap_lens, d)
    with torch.no_grad():
        t = best_times(fns, repeats)
        if with_loop:  # tens of seconds each on a CPU: one run is enough to see the ratio
            t |= best_times(loops, 1 if DEVICE.type == "cpu" else repeats, warmup=DEVICE.type != "cpu")
    g = fastest(t, "gemm")
    rows = [(f"GEMM ({n_img * R}x{D}) @ ({D}x{n_txt * W})", g, "1.00 (limit)")]
    for d in ("t2i", "i2t"):
        rows.append((f"scan_similarity {d}", t[d], f"{t[d] / g:.2f} x GEMM"))
        if with_loop:
            rows.append((f"per-caption loop {d}", t[f"loop {d}"], f"ours {t[f'loop {d}'] / t[d]:.1f}x faster"))
    return rows


def bf16_figures(n_img: int, n_txt: int, repeats: int) -> list[tuple[str, float, str]]:
    """The bf16-GEMM path (float32 elsewhere) against float32: time, and its error on these scores."""
    images, captions, cap_lens = make_inputs(n_img, n_txt, seed=2)
    rows = []
    with torch.no_grad():
        for d in ("t2i", "i2t"):
            fp32, bf16 = ours(images, captions, cap_lens, d), ours(images, captions, cap_lens, d, torch.bfloat16)
            t = best_times({"fp32": fp32, "bf16": bf16}, repeats)
            a, b = fp32(), bf16()
            err = (b - a).abs()
            spread = float(a.std())
            top1 = float((a.argmax(0) == b.argmax(0)).float().mean()) * 100  # per caption, its best image
            rows.append(
                (
                    f"scan_similarity {d} bf16 GEMM",
                    t["bf16"],
                    f"{t['fp32'] / t['bf16']:.2f}x the fp32 speed; |bf16 - fp32| max {float(err.max()):.1e}, mean "
                    f"{float(err.mean()):.1e} (scores' std {spread:.1e}); same top-1 image for {top1:.1f}% of captions",
                )
            )
    return rows


def training_figures(batch: int, repeats: int) -> list[tuple[str, float, str]]:
    images, captions, cap_lens = make_inputs(batch, batch, seed=1)

    def step(fn: Callable[..., Tensor]) -> Callable[[], None]:
        def run() -> None:
            im = images.clone().requires_grad_()
            cap = captions.clone().requires_grad_()
            fn(im, cap, cap_lens, "t2i").sum().backward()
            sync()

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
    s = torch.empty(C, R, Q, W, device=DEVICE)
    e = torch.empty(C, R, Q, W, device=DEVICE)
    scale = torch.rand(C, R, Q, 1, device=DEVICE)
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
    t = best_times({k: (lambda f=f: (f(), sync())) for k, f in phases.items()}, repeats)
    total = sum(t.values())
    rows = [(f"phase {k} ({C}x{R}x{Q}x{W} chunk)", v, f"{v / t['GEMM']:.3f} x GEMM") for k, v in t.items()]
    return rows + [("phases total", total, f"{total / t['GEMM']:.2f} x GEMM")]


def peak_mib() -> float:
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated(DEVICE) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def full_child(kind: str, block: tuple[int, int] | None = None) -> None:
    """Runs in a fresh process: one timed 1000 x 5000 run of `kind` (gemm, trimmed GEMM of a direction, or
    scan_similarity of a direction); prints JSON with the time and the peak memory (inputs included)."""
    images, captions, cap_lens = make_inputs(1000, 5000)
    base = peak_mib()
    with torch.no_grad():
        if kind.startswith("gemm"):  # "gemm" or "gemm t2i" / "gemm i2t" (trimmed to the columns ours multiplies)
            cols = trimmed_columns(cap_lens, 1000, kind.split()[1]) if " " in kind else None
            blocks = [block] if block else GEMM_BLOCKS  # the padded GEMM tries every block shape
            times = {}
            for shape in blocks:
                f = gemm_fn(images, captions, cols, shape)
                t0 = time.perf_counter()
                f()
                times[shape] = time.perf_counter() - t0
            shape = min(times, key=times.get)
            print(
                json.dumps({"seconds": times[shape], "block": list(shape), "peak_mib": peak_mib(), "inputs_mib": base})
            )
            return
        else:
            fn = ours(images, captions, cap_lens, kind)
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib(), "inputs_mib": base}))


def full_figures(repeats: int) -> list[tuple[str, float, str]]:
    kinds = ["gemm", "gemm t2i", "t2i", "gemm i2t", "i2t"]
    best: dict[str, dict] = {}
    block = None  # the padded GEMM's fastest block shape, used for the trimmed GEMMs
    for r in range(repeats):
        for kind in kinds:
            run = [sys.executable, __file__, "--child", kind, "--device", str(DEVICE)]
            if block and kind.startswith("gemm "):
                run += ["--block", "x".join(map(str, block))]
            t0 = time.perf_counter()
            res = json.loads(subprocess.run(run, check=True, capture_output=True, text=True).stdout)
            wall = time.perf_counter() - t0
            print(
                f"[full {r + 1}/{repeats}] {kind:<11} {res['seconds']:7.1f} s  (process {wall:.0f} s, load {load()})",
                file=sys.stderr,
                flush=True,
            )
            if kind not in best or res["seconds"] < best[kind]["seconds"]:
                best[kind] = res
                if kind == "gemm":
                    block = res["block"]
    g = best["gemm"]["seconds"]
    rows = [("GEMM (36000x1024) @ (1024x80000)", g, "1.00 (limit)")]
    for d in ("t2i", "i2t"):
        o, tr = best[d], best[f"gemm {d}"]["seconds"]
        rows.append((f"trimmed GEMM {d} (the columns ours multiplies)", tr, f"{tr / g:.2f} x GEMM"))
        rows.append(
            (
                f"scan_similarity {d} 1000x5000",
                o["seconds"],
                f"{o['seconds'] / g:.2f} x GEMM, {o['seconds'] / tr:.2f} x trimmed GEMM; peak "
                f"{o['peak_mib']:.0f} MiB ({o['peak_mib'] - o['inputs_mib']:.0f} over the inputs)",
            )
        )
    return rows


def main() -> None:
    global DEVICE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-img", type=int, default=100)
    p.add_argument("--n-txt", type=int, default=500)
    p.add_argument("--batch", type=int, default=128, help="training batch (images = captions)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs of each kind (default 5; 1 with --full)")
    p.add_argument("--full", action="store_true", help="also score 1000 x 5000 (Flickr30K test), minutes")
    p.add_argument("--phases", action="store_true", help="also time each pass on one default chunk")
    p.add_argument("--bf16", action="store_true", help="also the bf16-GEMM scoring path against fp32")
    p.add_argument("--no-loop", action="store_true", help="skip the slow per-caption loop")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--block", help=argparse.SUPPRESS)
    args = p.parse_args()
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if args.child:
        full_child(args.child, tuple(int(x) for x in args.block.split("x")) if args.block else None)
        return
    small, full = args.repeats or 5, args.repeats or 1
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {DEVICE} ({name}), best of {small} ({full} at full size), load {load()}")
    rows = scoring_figures(args.n_img, args.n_txt, small, not args.no_loop)
    if not args.no_loop:
        rows += training_figures(args.batch, small)
    if args.bf16:
        rows += bf16_figures(args.n_img, args.n_txt, small)
    if args.phases:
        rows += phase_figures(small * 4)
    if args.full:
        rows += full_figures(full)
    width = max(len(r[0]) for r in rows)
    for name, seconds, note in rows:
        print(f"{name:<{width}}  {seconds * 1e3:10.1f} ms  {note}")
    print(f"load at the end {load()}")


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()

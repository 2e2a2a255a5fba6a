"""`crossmatch evaluate`, `search` and `models`: load a checkpoint (or a run folder), score a split, print
or draw it. The work is in the library (crossmatch.runs, crossmatch.retrieval, crossmatch.search); this
module parses and prints. Top-level imports stay light (no torch).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from crossmatch.cli.help import add_command, add_device_option
from crossmatch.progress import show_progress

GALLERY_SUFFIXES = (".png", ".html", ".htm")
METRIC_DECIMALS = 4  # metrics JSON: 28.999999999999996 is written 29.0


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction) -> None:
    ev = add_command(
        sub,
        "evaluate",
        "retrieval metrics of a checkpoint (or a run folder's best.pt) on a split",
        "crossmatch evaluate runs/vse --split test --json runs/vse/test.json",
        "crossmatch evaluate runs/albef/checkpoints/best.pt eval.rerank_k=16 --html report.html",
        "crossmatch evaluate --model clip model.arch=ViT-B-32 model.pretrained=openai --data data/f30k",
        "crossmatch evaluate runs/vse --negatives data/shapes/test_negatives.jsonl --json runs/vse/negatives.json",
    )
    ev.add_argument(
        "checkpoint", nargs="?", help="a .pt or .safetensors file, or a run folder (uses checkpoints/best.pt)"
    )
    ev.add_argument("--model", default=None, help="instead of a checkpoint: a registered model built from its config")
    ev.add_argument(
        "--data", default=None, help="with --model: the dataset folder (data.root); with --negatives: the image root"
    )
    ev.add_argument("--split", default="test", help="val | test | train, or a split name of the dataset")
    ev.add_argument(
        "--max-images",
        type=int,
        default=0,
        help="only the split's first N images and their captions (twin pairs kept when both remain); default 0: all",
    )
    ev.add_argument("--json", default=None, help="also write the metrics dict to this JSON file")
    ev.add_argument("--html", default=None, help="also write an HTML report of the worst-ranked text queries")
    ev.add_argument(
        "--negatives",
        default=None,
        help="instead of retrieval: accuracy on (image, caption, negative) triples of this JSONL file, per type "
        "(--json writes it)",
    )
    add_device_option(ev)
    ev.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. eval.rerank_k=64 eval.folds=5")

    se = add_command(
        sub,
        "search",
        "rank a split's images for a sentence (or its captions for an image)",
        'crossmatch search runs/vse --query "a red circle left of a blue square" --out gallery.png',
        "crossmatch search runs/vse --image data/shapes/images/011000.png --out captions.html",
    )
    se.add_argument("checkpoint", help="a .pt or .safetensors file, or a run folder (uses checkpoints/best.pt)")
    group = se.add_mutually_exclusive_group(required=True)
    group.add_argument("--query", help="sentence to search images for")
    group.add_argument("--image", help="image file to search captions for")
    se.add_argument("--top-k", type=int, default=10, help="results to print and draw")
    se.add_argument("--out", default=None, help="also write the results: FILE.png (gallery) or FILE.html (page)")
    se.add_argument(
        "--explain", action="store_true", help="SCAN: draw each word's attention over the top images (OUT_explain.png)"
    )
    se.add_argument("--split", default="test", help="val | test | train, or a split name of the dataset")
    add_device_option(se)
    se.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. eval.rerank_k=16")

    md = add_command(
        sub,
        "models",
        "list the registered models with a one-line description",
        "crossmatch models",
        "crossmatch models scan",
    )
    md.add_argument("pattern", nargs="?", default="", help="only names containing this text")


def run(args: argparse.Namespace) -> bool:
    if args.command == "evaluate":
        if args.model and args.checkpoint and "=" in args.checkpoint:  # `--model clip model.arch=X`: an override
            args.checkpoint, args.overrides = None, [args.checkpoint, *args.overrides]
        run_evaluate(
            args.checkpoint,
            args.split,
            args.json,
            args.overrides,
            html_path=args.html,
            device=args.device,
            model_name=args.model,
            data_root=args.data,
            negatives=args.negatives,
            max_images=args.max_images,
        )
    elif args.command == "search":
        run_search(
            args.checkpoint,
            args.query,
            args.image,
            args.top_k,
            args.out,
            args.split,
            args.overrides,
            args.explain,
            args.device,
        )
    elif args.command == "models":
        run_models(args.pattern)
    else:
        return False
    return True


def run_models(pattern: str = "") -> None:
    from crossmatch.models.registry import describe_models

    rows = describe_models(pattern)
    width = max((len(n) for n in rows), default=0)
    for name, line in rows.items():
        print(f"{name:{width}}  {line}")


def format_table(metrics: dict[str, float]) -> str:
    """Two-row table: i2t and t2i R@1/5/10, medr, meanr; then rsum (and twin_acc)."""
    head = f"{'':5}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medr':>8}{'meanr':>9}"
    rows = [head]
    for d in ("i2t", "t2i"):
        m = [metrics[f"{d}_{k}"] for k in ("r1", "r5", "r10", "medr", "meanr")]
        rows.append(f"{d:5}{m[0]:8.2f}{m[1]:8.2f}{m[2]:8.2f}{m[3]:8.1f}{m[4]:9.2f}")
    tail = f"rsum {metrics['rsum']:.2f}"
    if "twin_acc" in metrics:
        tail += f"   twin_acc {metrics['twin_acc']:.2f}"
    return "\n".join([*rows, tail])


def split_name(cfg, split: str) -> str:
    """val/test/train map to the config's split names; anything else is a split name of the dataset."""
    return {"train": cfg.data.train_split, "val": cfg.data.val_split, "test": cfg.data.test_split}.get(split, split)


def run_evaluate(
    checkpoint: str,
    split: str = "test",
    json_path: str | None = None,
    overrides=(),
    progress: bool | None = None,
    html_path: str | None = None,
    device: str = "auto",
    model_name: str | None = None,
    data_root: str | None = None,
    negatives: str | None = None,
    max_images: int = 0,
) -> dict:
    """Metrics of a checkpoint, or (`model_name` + `data_root`, no checkpoint) of a model built from its
    config (zero-shot). With `negatives` (a JSONL file of triples), the compositional accuracy per
    perturbation type instead (crossmatch.retrieval.compositional), images resolved against `data_root` or
    the run's data.root. With `max_images` N > 0, only the split's first N images and their captions (the
    cut `eval.max_images` makes for validation)."""
    from crossmatch.config import validate_config
    from crossmatch.engine.distributed import init_distributed
    from crossmatch.errors import ConfigError
    from crossmatch.files import check_writable
    from crossmatch.retrieval.person import format_person_table
    from crossmatch.retrieval.rerank import reranks
    from crossmatch.runs import build_untrained_run, first_stage_only, load_run, make_evaluator

    for option, path in (("--json", json_path), ("--html", html_path)):
        if path:
            check_writable(path, option)  # before the evaluation, not after it
    if negatives and html_path:
        raise ConfigError("--html reports retrieval failures; with --negatives, write the accuracies with --json")
    if max_images < 0:
        raise ConfigError(f"--max-images must be >= 0 (0: the whole split), got {max_images}")
    if negatives and max_images:
        raise ConfigError("--max-images cuts a retrieval split; --negatives scores every triple of its file")
    progress = show_progress(override=progress)  # bars only on a terminal
    if (checkpoint is None) == (model_name is None) or (model_name is not None and not data_root):
        raise ConfigError("evaluate takes a CHECKPOINT, or --model NAME with --data ROOT (an untrained model)")
    if model_name is not None:
        model, cfg, tokenizer = build_untrained_run(model_name, data_root, list(overrides))
    else:
        model, cfg, tokenizer = load_run(checkpoint, list(overrides), need_data=not negatives)
    validate_config(cfg, training=False)
    dist = init_distributed(device)
    if negatives:
        return _evaluate_negatives(model, cfg, tokenizer, negatives, data_root, json_path, dist, progress)
    name = split_name(cfg, split)
    evaluator = make_evaluator(cfg, name, tokenizer, model, dist.device, progress, max_images)
    t0 = time.perf_counter()
    metrics, scores = evaluator.evaluate(model.to(dist.device))
    metrics = {k: round(v, METRIC_DECIMALS) for k, v in metrics.items()}
    protocol = f"{cfg.eval.folds} folds, " if cfg.eval.folds > 1 else ""
    protocol += f"re-ranking top-{cfg.eval.rerank_k}" if reranks(model, cfg.eval.rerank_k) else ""
    scored_by = cfg.model["name"]
    if first_stage_only(cfg, model):  # every score is the first stage's: say so, not the model's name
        scored_by = f"first stage {cfg.eval.first_stage} alone (not re-ranked by {cfg.model['name']})"
    subset = f"first {max_images} images, " if max_images else ""
    print(f"{scored_by} on {cfg.data.root} [{name}] {subset}{protocol} ({time.perf_counter() - t0:.1f} s)")
    print(format_person_table(metrics) if "t2i_mAP" in metrics else format_table(metrics))
    if json_path and dist.is_main:
        from crossmatch.files import write_text

        write_text(json_path, json.dumps(metrics, indent=2))
    if html_path and dist.is_main:
        from crossmatch.runs import open_split
        from crossmatch.search.report import report_from_scores

        ds = open_split(cfg, name).first_images(max_images)
        title = f"{cfg.model['name']} on {cfg.data.root} [{name}] (stage-1 scores)"
        paths = [r.path for r in ds.images]
        report_from_scores(
            html_path, scores, ds.captions, paths, ds.txt_to_img, top_k=5, max_queries=50, title=title, metrics=metrics
        )
        print(f"report written to {html_path}")
    return metrics


def _evaluate_negatives(model, cfg, tokenizer, negatives, data_root, json_path, dist, progress) -> dict:
    from crossmatch.files import write_text
    from crossmatch.retrieval.compositional import format_accuracy_table
    from crossmatch.runs import evaluate_negatives

    t0 = time.perf_counter()
    report = evaluate_negatives(cfg, model, tokenizer, negatives, dist.device, data_root, progress)
    root = data_root or cfg.data.root
    print(f"{cfg.model['name']} on {negatives} (images under {root}) ({time.perf_counter() - t0:.1f} s)")
    print(format_accuracy_table(report))
    if json_path and dist.is_main:
        out = {k: {**v, "accuracy": round(v["accuracy"], METRIC_DECIMALS)} for k, v in report.items()}
        doc = {"negatives": str(negatives), "model": cfg.model["name"], "types": out}
        write_text(json_path, json.dumps(doc, indent=2))
    return report


def run_search(
    checkpoint: str,
    query: str | None = None,
    image: str | None = None,
    top_k: int = 10,
    out: str | None = None,
    split: str = "test",
    overrides=(),
    explain: bool = False,
    device: str = "auto",
) -> list[tuple[int, float]]:
    """Text -> the split's images, or an image file -> the split's captions; printed, and drawn with --out
    (a .png gallery or an .html page, both directions). With `explain` (text queries), also draw each
    word's attention over the top images (SCAN models)."""
    from crossmatch.errors import ConfigError, DataError, ModelError
    from crossmatch.files import check_writable

    if top_k < 1:
        raise ConfigError(f"--top-k {top_k}: must be at least 1")
    if query is not None and not query.strip():
        raise DataError("the query is empty")
    if out:
        check_writable(out, "--out")
    if out and Path(out).suffix.lower() not in GALLERY_SUFFIXES:
        raise ConfigError(f"--out {out}: write a .png gallery or an .html page ({', '.join(GALLERY_SUFFIXES)})")

    from crossmatch.config import validate_config
    from crossmatch.engine.distributed import init_distributed
    from crossmatch.models.protocols import WordAttention
    from crossmatch.runs import build_eval_data, load_run, open_split

    model, cfg, tokenizer = load_run(checkpoint, list(overrides), need_data=True)
    validate_config(cfg, training=False)
    if explain and not isinstance(model, WordAttention):
        raise ModelError(f"model {cfg.model['name']} has no word attention to explain")
    dist = init_distributed(device)
    model.to(dist.device)
    ds = open_split(cfg, split_name(cfg, split))
    data = build_eval_data(cfg, ds, tokenizer, model)
    if query is not None:
        return _search_images(model, cfg, tokenizer, ds, data, query, top_k, out, split, explain, dist.device)
    return _search_captions(model, cfg, ds, data, image, top_k, out, split, dist.device)


def _search_images(model, cfg, tokenizer, ds, data, query, top_k, out, split, explain, device):
    from crossmatch.data.transforms import load_image
    from crossmatch.search.query import match_rank, text_query_scores

    scores, img, txt = text_query_scores(
        model, tokenizer, data, query, device, cfg.eval.rerank_k, cfg.eval.rerank_batch
    )
    top = scores.topk(min(top_k, len(scores)))
    wanted = query.strip().lower()
    matches = {ds.txt_to_img[t] for t, c in enumerate(ds.captions) if c.lower() == wanted}
    results = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    for rank, (i, s) in enumerate(results, 1):
        print(f"{rank:3d}  {s:7.4f}  {ds.images[i].path.name}{'  <- match' if i in matches else ''}")
    rank = match_rank(scores, matches)
    shown = {i for i, _ in results}
    if rank is not None and not matches & shown:
        print(f"true match at rank {rank}")
    if out and Path(out).suffix.lower() in (".html", ".htm"):
        from crossmatch.search.report import write_html_report

        rows = [[(ds.images[i].path, s, i in matches) for i, s in results]]
        missed = None
        if matches and not matches & shown:
            m = min(matches, key=lambda i: -float(scores[i]))
            missed = [(ds.images[m].path, float(scores[m]))]
        write_html_report(
            out, [query], rows, [rank] if rank else None, f"{cfg.model['name']} search [{split}]", missed=missed
        )
        print(f"report written to {out}")
    elif out:
        from crossmatch.search.gallery import draw_gallery

        pics = [load_image(ds.images[i].path) for i, _ in results]
        names = [ds.images[i].path.name for i, _ in results]
        outside = None
        if matches and not matches & shown:
            m = min(matches, key=lambda i: -float(scores[i]))
            outside = (ds.images[m].path.name, rank)
        is_match = [i in matches for i, _ in results]
        draw_gallery(query, pics, [s for _, s in results], is_match, out, names=names, match_rank=outside)
        print(f"gallery written to {out}")
    if explain:
        from crossmatch.search.explain import explain_path, explain_search

        words = [tokenizer.decode([t]) for t in tokenizer.encode(query)]
        path = explain_search(model, data.image_loader.dataset, ds, (img, txt), words, results, explain_path(out))
        print(f"word attention written to {path}")
    return results


def _search_captions(model, cfg, ds, data, image, top_k, out, split, device):
    from crossmatch.data.transforms import load_image, transform_from_config
    from crossmatch.search.query import image_query_scores

    pixels = load_image(image, cfg.data.max_image_pixels)
    scores = image_query_scores(model, transform_from_config(cfg.data, train=False)(pixels), data, device)
    top = scores.topk(min(top_k, len(scores)))
    own = _own_captions(ds, image)
    results = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    for rank, (t, s) in enumerate(results, 1):
        print(f"{rank:3d}  {s:7.4f}  {ds.captions[t]}{'  <- match' if t in own else ''}")
    if out and Path(out).suffix.lower() in (".html", ".htm"):
        from crossmatch.search.report import write_caption_report

        rows = [(ds.captions[t], s, t in own) for t, s in results]
        write_caption_report(out, image, rows, f"{cfg.model['name']} search [{split}]")
        print(f"report written to {out}")
    elif out:
        from crossmatch.search.gallery import draw_caption_gallery

        caps = [ds.captions[t] for t, _ in results]
        draw_caption_gallery(pixels, caps, [s for _, s in results], [t in own for t, _ in results], out)
        print(f"gallery written to {out}")
    return results


def _own_captions(ds, image: str) -> set[int]:
    """Caption indices of the split image stored at the same path as the query image (none for new images)."""
    target = Path(image).resolve()
    for rec in ds.images:
        if rec.path.resolve() == target:
            return set(rec.caption_ids)
    return set()

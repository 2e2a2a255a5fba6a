"""`crossmatch evaluate`, `search` and `demo`: load a checkpoint, score a split, print or draw it."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from crossmatch.cli.common import build_eval_data, build_untrained_run, load_run, make_evaluator, open_split
from crossmatch.data.transforms import load_image, transform_from_config
from crossmatch.engine.distributed import init_distributed
from crossmatch.errors import ConfigError, ModelError
from crossmatch.evaluation.evaluate import encode_all, to_device
from crossmatch.evaluation.explain import explain_path, explain_search
from crossmatch.evaluation.gallery import draw_gallery
from crossmatch.evaluation.person import format_person_table
from crossmatch.evaluation.rerank import below_candidates

log = logging.getLogger(__name__)


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
    model_name: str | None = None,
    data_root: str | None = None,
) -> dict[str, float]:
    """Metrics of a checkpoint, or (`model_name` + `data_root`, no checkpoint) of a model built from its config."""
    progress = sys.stderr.isatty() if progress is None else progress  # bars only on a terminal
    if (checkpoint is None) == (model_name is None) or (model_name is not None and not data_root):
        raise ConfigError("evaluate takes a CHECKPOINT, or --model NAME with --data ROOT (an untrained model)")
    if model_name is not None:
        model, cfg, tokenizer = build_untrained_run(model_name, data_root, list(overrides))
    else:
        model, cfg, tokenizer = load_run(checkpoint, list(overrides))
    dist = init_distributed()
    name = split_name(cfg, split)
    evaluator = make_evaluator(cfg, name, tokenizer, model, dist.device, progress)
    t0 = time.perf_counter()
    metrics = evaluator(model.to(dist.device))
    protocol = f"{cfg.eval.folds} folds, " if cfg.eval.folds > 1 else ""
    protocol += f"re-ranking top-{cfg.eval.rerank_k}" if cfg.eval.rerank_k and hasattr(model, "score_pairs") else ""
    print(f"{cfg.model['name']} on {cfg.data.root} [{name}] {protocol} ({time.perf_counter() - t0:.1f} s)")
    print(format_person_table(metrics) if "t2i_mAP" in metrics else format_table(metrics))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(metrics, indent=2))
    if html_path:
        write_failure_report(model, cfg, tokenizer, name, dist, html_path)
    return metrics


def write_failure_report(model, cfg, tokenizer, split: str, dist, html_path: str) -> None:
    """An HTML page of the worst-ranked text queries of the split (stage-1 scores, before any re-ranking)."""
    from crossmatch.evaluation.evaluate import compute_scores
    from crossmatch.evaluation.report import report_from_scores

    ds = open_split(cfg, split)
    scores = compute_scores(model, build_eval_data(cfg, ds, tokenizer, model), dist.device, cfg.eval.chunk_size)
    if dist.is_main:
        title = f"{cfg.model['name']} on {cfg.data.root} [{split}]"
        report_from_scores(
            html_path,
            scores,
            ds.captions,
            [r.path for r in ds.images],
            ds.txt_to_img,
            top_k=5,
            max_queries=50,
            sort="worst",
            title=title,
        )
        print(f"report written to {html_path}")


@torch.no_grad()
def rerank_query(model, scores: torch.Tensor, img: dict, txt: dict, k: int) -> torch.Tensor:
    """One text query: re-score its top-k images with `model.score_pairs`; the rest rank below them in
    stage-1 order. scores (N_img,) -> (N_img,) float64."""
    cand = scores.topk(min(k, len(scores))).indices  # (k,)
    rows_img = {name: v[cand.to(v.device)] for name, v in img.items()}
    rows_txt = {name: v.expand(len(cand), *v.shape[1:]) for name, v in txt.items()}  # the query, k times
    stage2 = torch.zeros(len(scores))
    stage2[cand] = model.score_pairs(rows_img, rows_txt).float().cpu()
    is_cand = torch.zeros(len(scores), dtype=torch.bool).index_fill_(0, cand.cpu(), True)  # (N_img,)
    return below_candidates(stage2, scores.float().cpu(), is_cand)


@torch.no_grad()
def run_search(
    checkpoint: str,
    query: str | None = None,
    image: str | None = None,
    top_k: int = 10,
    out: str | None = None,
    split: str = "test",
    overrides=(),
    explain: bool = False,
) -> list[tuple[int, float]]:
    """Text -> the split's images (and a gallery PNG with --out), or an image file -> the split's captions.
    With `explain` (text queries), also draw each word's attention over the top images (SCAN models)."""
    model, cfg, tokenizer = load_run(checkpoint, list(overrides))
    if explain and not hasattr(model, "word_attention"):
        raise ModelError(f"model {cfg.model['name']} has no word attention to explain")
    dist = init_distributed()
    model.to(dist.device)
    ds = open_split(cfg, split_name(cfg, split))
    data = build_eval_data(cfg, ds, tokenizer, model)
    if query is not None:
        ids = torch.tensor([tokenizer.encode(query)])
        txt = model.encode_text(to_device({"input_ids": ids, "attention_mask": ids != 0}, dist.device))
        img = encode_all(model.encode_image, data.image_loader, dist.device, "encode images", False)
        scores = model.similarity(img, txt)[:, 0].float().cpu()  # (N_img,) stage 1
        if cfg.eval.rerank_k > 0 and hasattr(model, "score_pairs"):  # fusion models: re-rank the top-k
            scores = rerank_query(model, scores, img, txt, cfg.eval.rerank_k)
        top = scores.topk(min(top_k, len(scores)))
        wanted = query.strip().lower()
        matches = {ds.txt_to_img[t] for t, c in enumerate(ds.captions) if c.lower() == wanted}
        results = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        for rank, (i, s) in enumerate(results, 1):
            print(f"{rank:3d}  {s:7.4f}  {ds.images[i].path.name}{'  <- match' if i in matches else ''}")
        if out and Path(out).suffix.lower() in (".html", ".htm"):
            from crossmatch.evaluation.report import write_html_report

            rows = [[(ds.images[i].path, s, i in matches) for i, s in results]]
            wrong = torch.ones(len(scores), dtype=torch.bool)
            wrong[list(matches)] = False
            # 1-based, ties pessimistic: every wrong image scoring at least as high ranks ahead
            ranks = [min(int((scores[wrong] >= scores[m]).sum()) + 1 for m in matches)] if matches else None
            write_html_report(out, [query], rows, ranks, f"{cfg.model['name']} search [{split}]")
            print(f"report written to {out}")
        elif out:
            pics = [load_image(ds.images[i].path) for i, _ in results]
            draw_gallery(query, pics, [s for _, s in results], [i in matches for i, _ in results], out)
            print(f"gallery written to {out}")
        if explain:
            words = [tokenizer.decode([t]) for t in ids[0].tolist()]
            path = explain_search(model, data.image_loader.dataset, ds, (img, txt), words, results, explain_path(out))
            print(f"word attention written to {path}")
        return results
    transform = transform_from_config(cfg.data, train=False)
    pic = transform(load_image(image))[None]
    img = model.encode_image(to_device({"image": pic}, dist.device))
    txt = encode_all(model.encode_text, data.text_loader, dist.device, "encode captions", False)
    scores = model.similarity(img, txt)[0].float().cpu()  # (N_txt,)
    top = scores.topk(min(top_k, len(scores)))
    results = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    for rank, (t, s) in enumerate(results, 1):
        print(f"{rank:3d}  {s:7.4f}  {ds.captions[t]}")
    return results

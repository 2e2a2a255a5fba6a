"""Why `albef_minilm`'s ITC does not learn in a short CPU run (issue 13): ITC-only training from the recipe
(configs/albef_minilm_shapes.yaml) under variants of the lr split, momentum distillation, the warm-up and the
text feature, with the recipe's own Trainer step (clip, scheduler, EMA update, queue), the ITM term switched off
(the fusion layers are the cost of a step, and ITC is what failed). Also a probe without training: how well the
pretrained MiniLM text half's [CLS] at layer 2 (the ITC text feature) tells captions apart, against its mean pool.

    python benchmarks/albef_itc_start.py --data DIR [--steps 60] [--variants base,split,...] [--threads 1]

Prints per variant: the train itc_loss (with the queue's columns, as the trainer logs it) averaged over each
block of 10 steps, the temperature, and at the end the ITC-only rsum on the first 100 val images and the
in-batch ITC loss of 4 val batches (no queue: chance is ln(B)); then the probe's figures; with the machine load.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch

from crossmatch.config import load_config
from crossmatch.engine.distributed import DistInfo
from crossmatch.runs import build_trainer

RECIPE = "configs/albef_minilm_shapes.yaml"
OLD = ["train.lr=1e-4", "train.tower_lr=0", "model.text_pool=cls"]  # the recipe before issue 13's fix
SPLIT = ["train.lr=1e-3", "train.tower_lr=1e-4"]  # new tensors 1e-3, the pretrained MiniLM tensors 1e-4
VARIANTS = {  # name -> config overrides on top of the recipe (after OLD, and --steps)
    "base": [],  # lr 1e-4 for everything, warm-up 50, the text half's [CLS] as ITC feature
    "lr1e-3": ["train.lr=1e-3"],  # everything at 1e-3, MiniLM included
    "split": SPLIT,
    "split_warm10": [*SPLIT, "train.warmup_steps=10"],
    "split_nomom": [*SPLIT, "model.momentum=false"],
    "split_alpha0": [*SPLIT, "loss.albef.alpha=0"],  # the queue, no distillation
    "split_temp05": [*SPLIT, "model.temp=0.05"],
    # the ITC text feature is the mean of the text half's tokens (model.text_pool=mean), not its [CLS]
    "base_meanpool": ["model.text_pool=mean"],
    "split_meanpool": [*SPLIT, "model.text_pool=mean"],  # = the recipe now
    "split_meanpool_warm10": [*SPLIT, "model.text_pool=mean", "train.warmup_steps=10"],
    "split_meanpool_nomom": [*SPLIT, "model.text_pool=mean", "model.momentum=false"],
}


def run_variant(name: str, args, overrides: list[str]) -> dict:
    extra = [f"data.root={args.data}", f"train.max_steps_per_epoch={args.steps}", "train.log_every=1000000"]
    cfg = load_config(RECIPE, [*extra, *OLD, *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        trainer, cfg = build_trainer(cfg, Path(tmp), DistInfo(0, 0, 1, torch.device("cpu")))
        task, model = trainer.task, trainer.model
        task._itm = lambda *a, **k: torch.zeros(())  # ITC only: the fusion layers do not run
        lrs = sorted({g["initial_lr"] for g in trainer.optimizer.param_groups if g["params"]}, reverse=True)
        task.train()
        task.on_epoch_start(0)
        trainer.train_loader.sampler.set_epoch(0, start=0)
        batches, curve, block, t0 = iter(trainer.train_loader), [], [], time.perf_counter()
        for step in range(args.steps):
            task.on_step(step / args.steps)
            logs = trainer.train_step([next(batches)])
            block.append(float(logs["itc_loss"]))
            if len(block) == 10 or step == args.steps - 1:
                curve.append(sum(block) / len(block))
                block = []
        train_s = time.perf_counter() - t0
        task.eval()
        with torch.no_grad():
            val = []
            for k, batch in enumerate(trainer.val_loader):
                if k == 4:
                    break
                feats = task.encode(batch)
                val.append(
                    float(task.itc(feats["image"]["embed"], feats["text"]["embed"], batch["image_idx"], model.temp))
                )
            metrics = trainer.evaluate()
        return {
            "curve": curve,
            "temp": model.temp.item(),
            "alpha": task.alpha() if model.config.momentum else 0.0,
            "val_inbatch_itc": sum(val) / len(val),
            "rsum": metrics["rsum"],
            "lrs": lrs,
            "s_per_step": train_s / args.steps,
            "batch": cfg.train.batch_size,
        }


def text_probe(args) -> None:
    """No training: caption -> nearest other caption (cosine) among the first 100 val images' captions; a hit
    is a caption of the same image. Layer-2 [CLS] vs layer-2 mean pool vs layer-6 mean pool (the checkpoint's
    sentence embedding), and the mean cosine between different captions (how alike everything looks)."""
    from crossmatch.data.loaders import collate
    from crossmatch.data.tokenizer import build_tokenizer
    from crossmatch.models import create_model
    from crossmatch.runs import open_split

    cfg = load_config(RECIPE, [f"data.root={args.data}"])
    ds = open_split(cfg, "val").first_images(100)
    caps = ds.captions
    owner = torch.tensor(ds.txt_to_img)  # (N,)
    tok = build_tokenizer("minilm", [], max_words=32)
    batch = collate([{"input_ids": ids} for ids in tok.encode_batch(caps)])
    vilt = create_model("vilt_minilm").eval()  # all six checkpoint layers, none with cross-attention
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()  # (N, L)
    m = mask[..., None].float()  # (N, L, 1)
    with torch.no_grad():
        x = vilt.text_embed(ids)  # (N, L, D)
        feats = {}
        for i, layer in enumerate(vilt.encoder.layers):
            x = layer(x, mask)  # (N, L, D) after checkpoint layer i
            if i in (2, 5):
                feats[f"layer-{i} [CLS]"], feats[f"layer-{i} mean"] = x[:, 0], (x * m).sum(1) / m.sum(1)  # (N, D)
    same = owner[:, None] == owner[None, :]
    for name, f in feats.items():
        f = torch.nn.functional.normalize(f, dim=1)
        sim = f @ f.t()
        off = ~torch.eye(len(f), dtype=torch.bool)
        hit = same.masked_fill(~off, False).gather(1, sim.masked_fill(~off, -2).argmax(1, keepdim=True)).float().mean()
        print(
            f"probe {name:28s}: nearest other caption is of the same image {100 * hit:.1f}% "
            f"(chance {100 * 4 / (len(f) - 1):.1f}%), mean cosine between captions {sim[off].mean():.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="shapes dataset dir (crossmatch data shapes --out DIR)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per variant (the cosine's length)")
    parser.add_argument("--variants", default="base,split", help=f"comma-separated, of {','.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-probe", action="store_true", help="skip the text-feature probe")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load {os.getloadavg()[0]:.2f} (1 min), {args.threads} thread(s), {args.steps} ITC-only steps each")
    if not args.no_probe:
        text_probe(args)
    for name in args.variants.split(","):
        torch.manual_seed(0)
        r = run_variant(name, args, VARIANTS[name])
        chance = math.log(r["batch"])
        print(
            f"{name:15s} lrs {r['lrs']}: train itc_loss per 10 steps "
            + " ".join(f"{v:.2f}" for v in r["curve"])
            + f" | temp {r['temp']:.4f} alpha {r['alpha']:.2f} | val in-batch ITC {r['val_inbatch_itc']:.2f} "
            f"(chance {chance:.2f}) | val ITC rsum {r['rsum']:.1f} (100 images) | {r['s_per_step']:.1f} s/step "
            f"| load {os.getloadavg()[0]:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Training curves of a run as one PNG: train and validation loss, and the validation metric, per epoch.

Read from the run's `metrics.jsonl` (crossmatch.engine.logging.MetricLogger): train rows carry `loss` at
logged steps, validation rows carry the validation `loss` and the retrieval metrics at each validated
epoch; every row records the epoch (fractional within an epoch for train rows). Drawn with matplotlib's
non-interactive Agg backend, written atomically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from crossmatch.errors import DataError
from crossmatch.files import atomic_write


def read_curves(metrics_jsonl: str | Path, metric: str = "rsum") -> dict[str, list[tuple[float, float]]]:
    """The (epoch, value) points of a run: `train_loss` (logged steps), `val_loss` and `val_<metric>`
    (validated epochs). Rows without an epoch (written before it was recorded) are placed by their step,
    assuming evenly spaced validations.

    Raises:
        DataError: the file is missing or a line is not JSON.
    """
    path = Path(metrics_jsonl)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    rows = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {n} is not JSON: {err.msg}") from err
    val_steps = sorted({r["step"] for r in rows if r.get("split") == "val"})
    per_epoch = val_steps[0] if val_steps else 0  # fallback for rows without an epoch

    def epoch(r: dict) -> float:
        if "epoch" in r:
            return float(r["epoch"])
        return r["step"] / per_epoch if per_epoch else float(r["step"])

    curves: dict[str, list[tuple[float, float]]] = {"train_loss": [], "val_loss": [], f"val_{metric}": []}
    for r in rows:
        split = r.get("split")
        if split == "train" and "loss" in r:
            curves["train_loss"].append((epoch(r), float(r["loss"])))
        elif split == "val" and "loss" in r:
            curves["val_loss"].append((epoch(r), float(r["loss"])))
        if split == "val" and metric in r:
            curves[f"val_{metric}"].append((epoch(r), float(r[metric])))
    return curves


def plot_curves(metrics_jsonl: str | Path, out: str | Path, metric: str = "rsum", title: str = "") -> Path:
    """Draw `read_curves` into `out` (PNG): loss on the left (train per logged step, val per epoch), the
    validation metric per epoch on the right. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    curves = read_curves(metrics_jsonl, metric)
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, style, label in (("train_loss", "-", "train loss"), ("val_loss", "o-", "val loss")):
        if curves[key]:
            x, y = zip(*curves[key], strict=True)
            ax_loss.plot(x, y, style, label=label)
    losses = [v for key in ("train_loss", "val_loss") for _, v in curves[key]]
    if losses and min(losses) > 0 and max(losses) > 20 * min(losses):
        ax_loss.set_yscale("log")  # e.g. a sum of violations during a warm-up, then hardest negatives
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    if curves[f"val_{metric}"]:
        x, y = zip(*curves[f"val_{metric}"], strict=True)
        ax_metric.plot(x, y, "o-", color="tab:green")
        for xi, yi in zip(x, y, strict=True):
            ax_metric.annotate(f"{yi:.1f}", (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center")
    ax_metric.set(xlabel="epoch", ylabel=metric, title=f"validation {metric}")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write(out, lambda f: f.write(buf.getvalue()))

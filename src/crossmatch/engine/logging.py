"""Two logging channels: text through `logging` (console + the run's train.log, quiet on non-main
ranks) and scalars through `MetricLogger` (TensorBoard, one writer per split so that train and val
curves of the same tag share a chart, plus a metrics.jsonl file with the plain keys)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(run_dir: str | Path | None = None, is_main: bool = True, level: int = logging.INFO) -> None:
    """Console + `run_dir/train.log` on the main rank; warnings only elsewhere."""
    root = logging.getLogger("crossmatch")
    held = [r for h in root.handlers if isinstance(h, _Held) for r in h.records]
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(level if is_main else logging.WARNING)
    root.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if run_dir is not None and is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(run_dir) / "train.log")
        fh.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(fh)
        for record in held:  # logged by hold_run_log's phase, before train.log could exist
            fh.handle(record)


class _Held(logging.Handler):
    """Keeps records in memory (see hold_run_log)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def hold_run_log(is_main: bool = True, level: int = logging.INFO) -> None:
    """Console logging now; what is logged until `setup_logging(run_dir)` is kept and written at the top of
    the run's train.log then (a run checks its whole start before it writes anything in its folder)."""
    setup_logging(None, is_main, level)
    logging.getLogger("crossmatch").addHandler(_Held())


def close_run_log(run_dir: str | Path) -> None:
    """Detach and close the `run_dir/train.log` handler of `setup_logging` (the console stays), so that what the
    process logs after the run (a second run, an evaluation) never lands in this run's log, and a removed run
    folder is not written to again."""
    root = logging.getLogger("crossmatch")
    path = os.path.abspath(Path(run_dir) / "train.log")  # as FileHandler stores it
    for h in list(root.handlers):
        if isinstance(h, _Held) or (isinstance(h, logging.FileHandler) and h.baseFilename == path):
            root.removeHandler(h)
            h.close()


def tag(key: str, split: str) -> str:
    """TensorBoard tag of a scalar: loss terms (`loss`, `*_loss`) keep their name in every split, so the
    train and val writers draw them on one chart; the rest is grouped (`train/lr`, `retrieval/i2t_r1`)."""
    if key == "loss" or key.endswith("_loss"):
        return key
    return f"retrieval/{key}" if split == "val" else f"{split}/{key}"


class MetricLogger:
    """`log(metrics, step, split)` -> TensorBoard `run_dir/tb/{split}` and `run_dir/metrics.jsonl`."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.tensorboard = tensorboard
        self._writers: dict = {}

    def _writer(self, split: str):
        if split not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[split] = SummaryWriter(str(self.run_dir / "tb" / split))
        return self._writers[split]

    def log(self, metrics: dict[str, float], step: int, split: str = "train", epoch: float | None = None) -> None:
        """Write one row of scalars at optimizer step `step`; `epoch` (epochs done, fractional within an
        epoch) goes into the JSONL row only, for per-epoch curves (`crossmatch.search.curves`)."""
        if not self.enabled:
            return
        if self.tensorboard:
            w = self._writer(split)
            for k, v in metrics.items():
                w.add_scalar(tag(k, split), v, step)
        where = {"split": split, "step": step, **({"epoch": round(epoch, 4)} if epoch is not None else {})}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({**where, **metrics}) + "\n")

    def flush(self) -> None:
        for w in self._writers.values():
            w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()

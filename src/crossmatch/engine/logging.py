"""Two logging channels: text through `logging` (console + the run's train.log, quiet on non-main
ranks) and scalars through `MetricLogger`, to the backends named in `train.loggers`: `tensorboard` (one
writer per split so that train and val curves of the same tag share a chart), `jsonl` (metrics.jsonl with the
plain keys: what curves.png is drawn from) and `wandb` (Weights & Biases, its own optional package; a run
under `WANDB_MODE=offline` writes it locally, under the run folder)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from crossmatch.config import LOGGERS
from crossmatch.errors import ConfigError

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


DEFAULT_LOGGERS = ("tensorboard", "jsonl")


def check_loggers(loggers: list[str] | tuple[str, ...]) -> None:
    """Every name in `train.loggers` is a known backend, and `wandb` is importable when named.

    Raises:
        ConfigError: an unknown name, or wandb without its package.
    """
    for name in loggers:
        if name not in LOGGERS:
            raise ConfigError(f"train.loggers: unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
    if "wandb" in loggers:
        try:
            import wandb  # noqa: F401
        except ImportError as err:
            raise ConfigError("train.loggers: wandb needs its package: pip install 'crossmatch[wandb]'") from err


class MetricLogger:
    """`log(metrics, step, split)` -> the backends in `loggers`: TensorBoard `run_dir/tb/{split}`,
    `run_dir/metrics.jsonl`, a wandb run (`run_dir/wandb/`, its name the run folder's, `config` its config)."""

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        loggers: list[str] | tuple[str, ...] = DEFAULT_LOGGERS,
        config: dict[str, Any] | None = None,
    ):
        check_loggers(loggers)
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.loggers = tuple(loggers)
        self.config = config or {}  # what the wandb run records as its config
        self._writers: dict = {}
        self._wandb = None

    def _writer(self, split: str):
        if split not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[split] = SummaryWriter(str(self.run_dir / "tb" / split))
        return self._writers[split]

    def _wandb_run(self):
        if self._wandb is None:
            import wandb

            self._wandb = wandb.init(dir=str(self.run_dir), name=self.run_dir.name, config=self.config)
        return self._wandb

    def log(self, metrics: dict[str, float], step: int, split: str = "train", epoch: float | None = None) -> None:
        """Write one row of scalars at optimizer step `step`; `epoch` (epochs done, fractional within an
        epoch) goes into the JSONL row only, for per-epoch curves (`crossmatch.search.curves`)."""
        if not self.enabled:
            return
        if "tensorboard" in self.loggers:
            w = self._writer(split)
            for k, v in metrics.items():
                w.add_scalar(tag(k, split), v, step)
        if "jsonl" in self.loggers:
            where = {"split": split, "step": step, **({"epoch": round(epoch, 4)} if epoch is not None else {})}
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({**where, **metrics}) + "\n")
        if "wandb" in self.loggers:
            self._wandb_run().log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def flush(self) -> None:
        for w in self._writers.values():
            w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

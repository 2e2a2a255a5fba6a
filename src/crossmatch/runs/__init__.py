"""Runs: everything between a config (or a checkpoint) and the objects that train, evaluate and search.

- `build`: config -> tokenizer, model (`build_model`) and preprocessing; checkpoint, safetensors export or run
  folder -> the model, config and tokenizer it was trained with (`load_run`, behind `crossmatch.load`);
- `evaluation`: config -> evaluation data and `Evaluator` of a split, with its protocol checked;
- `training`: config -> a ready `Trainer` (`build_trainer`);
- `lifecycle`: a whole training run in a run folder (`train`).

The CLI parses arguments, calls these and prints; nothing here reads flags.
"""

from crossmatch.runs.build import (
    DATA_FROM_RUN,
    MAX_BOXES,
    best_validation_row,
    build_model,
    build_run_tokenizer,
    build_untrained_run,
    check_image_size,
    data_root_candidates,
    load_run,
    locate_data_root,
    needs_boxes,
    open_split,
    resolve_checkpoint,
    resolve_preprocess,
    resolved_model_section,
    run_folder_of,
)
from crossmatch.runs.evaluation import (
    build_eval_data,
    check_protocol,
    check_split_overlap,
    evaluate_negatives,
    first_stage_only,
    image_identities,
    make_evaluator,
)
from crossmatch.runs.lifecycle import RUN_FILES, check_run_dir, log_run_header, train
from crossmatch.runs.training import build_stream_loader, build_trainer, seed_everything

__all__ = [
    "DATA_FROM_RUN",
    "MAX_BOXES",
    "RUN_FILES",
    "best_validation_row",
    "build_eval_data",
    "build_model",
    "build_run_tokenizer",
    "build_stream_loader",
    "build_trainer",
    "build_untrained_run",
    "check_image_size",
    "check_protocol",
    "check_run_dir",
    "check_split_overlap",
    "data_root_candidates",
    "evaluate_negatives",
    "first_stage_only",
    "image_identities",
    "load_run",
    "locate_data_root",
    "log_run_header",
    "make_evaluator",
    "needs_boxes",
    "open_split",
    "resolve_checkpoint",
    "resolve_preprocess",
    "resolved_model_section",
    "run_folder_of",
    "seed_everything",
    "train",
]

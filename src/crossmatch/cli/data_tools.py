"""`crossmatch data validate` and `crossmatch data convert`: check a dataset file end to end (every image
decoded, every caption and id checked, all problems reported) and convert between formats.

    crossmatch data validate PATH [--format F] [--json-name N] [--image-dir D]
    crossmatch data convert SRC DST --to karpathy|jsonl|webdataset [--from F] [--json-name N] [--shard-size N]

PATH and SRC are a dataset folder or its annotation file, or (webdataset) a folder of .tar shards or a brace
pattern. Formats: karpathy, jsonl, cuhk_pedes, icfg_pedes, rstpreid, webdataset (guessed when not given).
Heavy imports happen in `run`, not at parser build time.
"""

from __future__ import annotations

import argparse
import sys

FORMATS = ("karpathy", "jsonl", "cuhk_pedes", "icfg_pedes", "rstpreid", "webdataset")


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction) -> None:
    """Register `data validate` and `data convert` under `crossmatch data`."""
    val = data_sub.add_parser("validate", help="check a dataset: images decode, captions, ids, split sizes")
    val.add_argument("path", help="dataset folder or annotation file")
    val.add_argument("--format", choices=FORMATS, default=None, help="default: guessed from the file name")
    val.add_argument("--json-name", default="", help="annotation file name inside the folder")
    val.add_argument("--image-dir", default="", help="image folder (default {root}/images, or {root}/imgs)")

    conv = data_sub.add_parser("convert", help="convert a dataset to Karpathy JSON, JSONL or WebDataset shards")
    conv.add_argument("src", help="dataset folder or annotation file")
    conv.add_argument("dst", help="output file")
    conv.add_argument("--to", required=True, choices=("karpathy", "jsonl", "webdataset"))
    conv.add_argument("--from", dest="from_format", choices=FORMATS, default=None, help="default: guessed")
    conv.add_argument("--json-name", default="", help="annotation file name inside the SRC folder")
    conv.add_argument("--shard-size", type=int, default=1000, help="webdataset: samples per shard (default 1000)")


def run(args: argparse.Namespace) -> bool:
    """Handle `data validate` / `data convert`; False for any other command."""
    if args.command != "data" or args.data_command not in ("validate", "convert"):
        return False
    from crossmatch.data.check import (
        check_entries,
        check_shards,
        convert,
        first_problem,
        format_report,
        read_entries,
        resolve_source,
    )
    from crossmatch.errors import DataError

    if args.data_command == "validate":
        src = resolve_source(args.path, args.format, args.json_name, args.image_dir)
        if src.fmt == "webdataset":
            report = check_shards(src.file, progress=sys.stderr.isatty())
        else:
            report = check_entries(read_entries(src), src.image_dir, progress=sys.stderr.isatty())
        print(format_report(src, report))
        if report.n_problems:
            raise DataError(f"{report.n_problems} problem(s) in {src.file}, first: {first_problem(report)}")
        return True
    src = resolve_source(args.src, args.from_format, args.json_name)
    out = convert(src, args.dst, args.to, args.shard_size)
    if args.to == "webdataset":
        print(f"wrote {len(list(out.glob('*.tar')))} shard(s) to {out} from {src.file} ({src.fmt})")
    else:
        print(f"wrote {out} ({args.to}) from {src.file} ({src.fmt}); image paths are relative to {src.image_dir}")
    return True

"""`crossmatch data validate` and `crossmatch data convert`: check a dataset file end to end (every image
decoded, every caption and id checked, all problems reported) and convert between formats.

    crossmatch data validate PATH [--format F] [--json-name N] [--image-dir D]
    crossmatch data convert SRC DST --to karpathy|jsonl [--from F] [--json-name N]

PATH and SRC are a dataset folder or its annotation file. Formats: karpathy, jsonl, cuhk_pedes, icfg_pedes,
rstpreid (guessed from the file name when not given). Heavy imports happen in `run`, not at parser build time.
"""

from __future__ import annotations

import argparse
import sys

FORMATS = ("karpathy", "jsonl", "cuhk_pedes", "icfg_pedes", "rstpreid")


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction) -> None:
    """Register `data validate` and `data convert` under `crossmatch data`."""
    val = data_sub.add_parser("validate", help="check a dataset: images decode, captions, ids, split sizes")
    val.add_argument("path", help="dataset folder or annotation file")
    val.add_argument("--format", choices=FORMATS, default=None, help="default: guessed from the file name")
    val.add_argument("--json-name", default="", help="annotation file name inside the folder")
    val.add_argument("--image-dir", default="", help="image folder (default {root}/images, or {root}/imgs)")
    val.add_argument(
        "--allow-outside-root", action="store_true", help="accept image paths that leave the image folder (../, /abs)"
    )

    conv = data_sub.add_parser("convert", help="convert a dataset file to Karpathy JSON or JSONL")
    conv.add_argument("src", help="dataset folder or annotation file")
    conv.add_argument("dst", help="output file")
    conv.add_argument("--to", required=True, choices=("karpathy", "jsonl"))
    conv.add_argument("--from", dest="from_format", choices=FORMATS, default=None, help="default: guessed")
    conv.add_argument("--json-name", default="", help="annotation file name inside the SRC folder")


def run(args: argparse.Namespace) -> bool:
    """Handle `data validate` / `data convert`; False for any other command."""
    if args.command != "data" or args.data_command not in ("validate", "convert"):
        return False
    from crossmatch.data.check import check_entries, convert, first_problem, format_report, read_entries, resolve_source
    from crossmatch.errors import DataError

    if args.data_command == "validate":
        src = resolve_source(args.path, args.format, args.json_name, args.image_dir)
        entries = read_entries(src)
        report = check_entries(entries, src.image_dir, sys.stderr.isatty(), args.allow_outside_root)
        print(format_report(src, report))
        if report.n_problems:
            raise DataError(f"{report.n_problems} problem(s) in {src.file}, first: {first_problem(report)}")
        return True
    src = resolve_source(args.src, args.from_format, args.json_name)
    out = convert(src, args.dst, args.to)
    print(f"wrote {out} ({args.to}) from {src.file} ({src.fmt}); image paths are relative to {src.image_dir}")
    return True

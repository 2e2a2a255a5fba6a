"""`crossmatch data shapes | tuxpaint | validate | convert`: render the synthetic shapes dataset, build the
Tux Paint stamps dataset (real captioned pictures), check a dataset file end to end (every image decoded,
every caption and id checked, all problems reported) and convert between formats.

    crossmatch data shapes --out DIR [--train N] [--val N] [--test N] [--seed S] [--size PX]
    crossmatch data tuxpaint --out DIR [--source PATH_TO_DEB_OR_STAMPS_DIR]
    crossmatch data validate PATH [--format F] [--json-name N] [--image-dir D]
    crossmatch data convert SRC DST --to karpathy|jsonl|webdataset [--from F] [--json-name N] [--shard-size N]

PATH and SRC are a dataset folder or its annotation file, or (webdataset) a folder of .tar shards or a brace
pattern. Formats: karpathy, jsonl, cuhk_pedes, icfg_pedes, rstpreid, webdataset (guessed when not given).
Heavy imports happen in `run`, not at parser build time.
"""

from __future__ import annotations

import argparse
import sys

from crossmatch.cli.help import add_command

FORMATS = ("karpathy", "jsonl", "cuhk_pedes", "icfg_pedes", "rstpreid", "webdataset")


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction) -> None:
    """Register `data shapes`, `data validate` and `data convert` under `crossmatch data`."""
    shapes = add_command(
        data_sub,
        "shapes",
        "render the synthetic captioned-shapes dataset (Karpathy JSON + PNGs + object boxes + exact negatives)",
        "crossmatch data shapes --out data/shapes",
        "crossmatch data shapes --out data/tiny --train 200 --val 50 --test 50 --size 32",
    )
    shapes.add_argument("--out", required=True, help="output folder (dataset.json, test_negatives.jsonl, images/)")
    shapes.add_argument("--train", type=int, default=10000, help="train images")
    shapes.add_argument("--val", type=int, default=1000, help="val images")
    shapes.add_argument("--test", type=int, default=1000, help="test images")
    shapes.add_argument("--seed", type=int, default=0, help="random seed (the dataset is a function of it)")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels")

    tux = add_command(
        data_sub,
        "tuxpaint",
        "build a real captioned dataset from Debian's tuxpaint-stamps-default (GPL-2), split by caption text",
        "crossmatch data tuxpaint --out data/tuxpaint",
        "crossmatch data tuxpaint --out data/tuxpaint --source tuxpaint-stamps-default_2022.06.04-1_all.deb",
    )
    tux.add_argument("--out", required=True, help="output folder (dataset.json + images/), written atomically")
    tux.add_argument(
        "--source", default=None, help="the package's .deb, or an unpacked package / stamps folder (default: apt-get)"
    )

    val = add_command(
        data_sub,
        "validate",
        "check a dataset: images decode, captions, ids, split sizes",
        "crossmatch data validate data/shapes",
        "crossmatch data validate data/cuhk/reid_raw.json --format cuhk_pedes",
    )
    val.add_argument("path", help="dataset folder or annotation file")
    val.add_argument("--format", choices=FORMATS, default=None, help="guessed from the file name when not given")
    val.add_argument("--json-name", default="", help="annotation file name inside the folder")
    val.add_argument("--image-dir", default="", help="image folder (default {root}/images, or {root}/imgs)")
    val.add_argument(
        "--allow-outside-root", action="store_true", help="accept image paths that leave the image folder (../, /abs)"
    )

    conv = add_command(
        data_sub,
        "convert",
        "convert a dataset to Karpathy JSON, JSONL or WebDataset shards",
        "crossmatch data convert data/shapes data/shapes.jsonl --to jsonl",
        "crossmatch data convert data/shapes data/shards --to webdataset --shard-size 1000",
    )
    conv.add_argument("src", help="dataset folder or annotation file")
    conv.add_argument("dst", help="output file (a folder of shards for --to webdataset)")
    conv.add_argument("--to", required=True, choices=("karpathy", "jsonl", "webdataset"), help="output format")
    conv.add_argument("--from", dest="from_format", choices=FORMATS, default=None, help="guessed when not given")
    conv.add_argument("--json-name", default="", help="annotation file name inside the SRC folder")
    conv.add_argument("--shard-size", type=int, default=1000, help="webdataset: samples per shard")


def run(args: argparse.Namespace) -> bool:
    """Handle `data shapes | tuxpaint | validate | convert`; False for any other command."""
    if args.command != "data" or args.data_command not in ("shapes", "tuxpaint", "validate", "convert"):
        return False
    if args.data_command == "tuxpaint":
        from crossmatch.data.tuxpaint import build_tuxpaint

        path, sizes = build_tuxpaint(args.out, args.source)
        skipped = sizes.pop("svg_only_skipped")
        split_text = ", ".join(f"{k} {v}" for k, v in sizes.items())
        print(f"wrote {path}: {split_text} images (one caption each); {skipped} SVG-only stamps left out")
        return True
    if args.data_command == "shapes":
        from crossmatch.data.shapes import NEGATIVES_FILE, generate_shapes

        path = generate_shapes(
            args.out, args.train, args.val, args.test, seed=args.seed, size=args.size, progress=sys.stderr.isatty()
        )
        print(f"wrote {path} (with exact negatives per caption) and {path.parent / NEGATIVES_FILE} (test triples)")
        return True
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
            report = check_entries(read_entries(src), src.image_dir, sys.stderr.isatty(), args.allow_outside_root)
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

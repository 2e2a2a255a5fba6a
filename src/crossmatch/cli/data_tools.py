"""`crossmatch data shapes | people | tuxpaint | validate | convert`: render the synthetic shapes dataset or
the synthetic person-search dataset (CUHK-PEDES format), build the Tux Paint stamps dataset (real captioned
pictures), check a dataset file end to end (every image decoded, every caption and id checked, all problems
reported) and convert between formats.

    crossmatch data shapes --out DIR [--train N] [--val N] [--test N] [--seed S] [--size PX]
    crossmatch data people --out DIR [--train N] [--val N] [--test N] [--images-per-id K]
        [--captions-per-image C] [--size H W] [--seed S]
    crossmatch data tuxpaint --out DIR [--source PATH_TO_DEB_OR_STAMPS_DIR]
    crossmatch data validate PATH [--format F] [--json-name N] [--image-dir D] [CSV/FOLDER OPTIONS]
    crossmatch data convert SRC DST --to karpathy|jsonl|webdataset [--from F] [--json-name N] [--shard-size N]

PATH and SRC are a dataset folder or its annotation file, or (webdataset) a folder of .tar shards or a brace
pattern. Formats: karpathy, jsonl, cuhk_pedes, icfg_pedes, rstpreid, webdataset, csv (open_clip's tables),
folder (images with .txt captions) (guessed when not given). CSV/FOLDER OPTIONS: --csv-img-key,
--csv-caption-key, --csv-separator, --split-file (the data.csv_* and data.split_file keys of a run).
Heavy imports happen in `run`, not at parser build time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crossmatch.cli.help import add_command
from crossmatch.progress import show_progress

FORMATS = ("karpathy", "jsonl", "cuhk_pedes", "icfg_pedes", "rstpreid", "webdataset", "csv", "folder")


def add_csv_folder_options(p: argparse.ArgumentParser) -> None:
    """The csv and folder readers' settings, named and defaulted as the run config's data.* keys."""
    p.add_argument("--csv-img-key", default="filepath", help="csv: column of image paths (data.csv_img_key)")
    p.add_argument("--csv-caption-key", default="title", help="csv: column of captions (data.csv_caption_key)")
    p.add_argument("--csv-separator", default="\t", help="csv: column separator, default tab (data.csv_separator)")
    p.add_argument("--split-file", default="", help="folder: JSON {image path: split} (data.split_file)")


def csv_folder_options(args: argparse.Namespace) -> dict:
    return {
        "img_key": args.csv_img_key,
        "caption_key": args.csv_caption_key,
        "sep": args.csv_separator,
        "split_file": args.split_file,
    }


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction) -> None:
    """Register `data shapes`, `data people`, `data tuxpaint`, `data validate` and `data convert` under
    `crossmatch data`."""
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

    people = add_command(
        data_sub,
        "people",
        "render the synthetic person-search dataset (CUHK-PEDES reid_raw.json + PNGs, twin identities)",
        "crossmatch data people --out data/people",
        "crossmatch data people --out data/people_tiny --train 60 --val 10 --test 10 --size 96 32",
    )
    people.add_argument("--out", required=True, help="output folder (reid_raw.json, imgs/)")
    people.add_argument("--train", type=int, default=1500, help="train identities")
    people.add_argument("--val", type=int, default=200, help="val identities")
    people.add_argument("--test", type=int, default=200, help="test identities")
    people.add_argument("--images-per-id", type=int, default=4, help="images of each identity")
    people.add_argument("--captions-per-image", type=int, default=2, help="captions of each image")
    people.add_argument("--size", type=int, nargs=2, default=[128, 48], metavar=("H", "W"), help="image size in pixels")
    people.add_argument("--seed", type=int, default=0, help="random seed (the dataset is a function of it)")

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
        "crossmatch data validate data/cc/train.csv --csv-separator , --csv-caption-key caption",
        "crossmatch data validate photos/ --format folder",
    )
    val.add_argument("path", help="dataset folder or annotation file")
    val.add_argument("--format", choices=FORMATS, default=None, help="guessed from the file name when not given")
    val.add_argument("--json-name", default="", help="annotation file name inside the folder")
    val.add_argument("--image-dir", default="", help="image folder (default {root}/images, or {root}/imgs)")
    val.add_argument(
        "--allow-outside-root", action="store_true", help="accept image paths that leave the image folder (../, /abs)"
    )
    add_csv_folder_options(val)

    conv = add_command(
        data_sub,
        "convert",
        "convert a dataset to Karpathy JSON, JSONL or WebDataset shards",
        "crossmatch data convert data/shapes data/shapes.jsonl --to jsonl",
        "crossmatch data convert data/shapes data/shards --to webdataset --shard-size 1000",
        "crossmatch data convert photos/ photos/dataset.jsonl --to jsonl --from folder",
    )
    conv.add_argument("src", help="dataset folder or annotation file")
    conv.add_argument("dst", help="output file (a folder of shards for --to webdataset)")
    conv.add_argument("--to", required=True, choices=("karpathy", "jsonl", "webdataset"), help="output format")
    conv.add_argument("--from", dest="from_format", choices=FORMATS, default=None, help="guessed when not given")
    conv.add_argument("--json-name", default="", help="annotation file name inside the SRC folder")
    conv.add_argument("--shard-size", type=int, default=1000, help="webdataset: samples per shard")
    add_csv_folder_options(conv)


def run(args: argparse.Namespace) -> bool:
    """Handle `data shapes | people | tuxpaint | validate | convert`; False for any other command."""
    if args.command != "data" or args.data_command not in ("shapes", "people", "tuxpaint", "validate", "convert"):
        return False
    if args.data_command == "people":
        from crossmatch.data.people import generate_people

        path = generate_people(
            args.out, args.train, args.val, args.test, args.images_per_id, args.captions_per_image,
            size=tuple(args.size), seed=args.seed, progress=show_progress(),
        )  # fmt: skip
        print(people_summary(path))
        return True
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
            args.out, args.train, args.val, args.test, seed=args.seed, size=args.size, progress=show_progress()
        )
        print(shapes_summary(path, path.parent / NEGATIVES_FILE))
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
        src = resolve_source(args.path, args.format, args.json_name, args.image_dir, csv_folder_options(args))
        if src.fmt == "webdataset":
            report = check_shards(src.file, progress=show_progress())
        else:
            report = check_entries(read_entries(src), src.image_dir, show_progress(), args.allow_outside_root)
        print(format_report(src, report))
        if report.n_problems:
            raise DataError(f"{report.n_problems} problem(s) in {src.file}, first: {first_problem(report)}")
        return True
    src = resolve_source(args.src, args.from_format, args.json_name, options=csv_folder_options(args))
    out = convert(src, args.dst, args.to, args.shard_size)
    print(convert_summary(src, out, args.to))
    return True


def convert_summary(src, out, to: str) -> str:
    """What `data convert` wrote (images, captions, splits, size) and the next step."""
    from collections import Counter
    from pathlib import Path

    from crossmatch.cli.train import folder_size
    from crossmatch.data.check import read_entries

    entries = read_entries(src)
    splits = Counter(str(e.get("split")) for e in entries)
    n_caps = sum(len(e["captions"]) for e in entries)
    size = (folder_size(out) if Path(out).is_dir() else Path(out).stat().st_size) / 2**20
    what = f"{len(entries)} images, {n_caps} captions ({', '.join(f'{k} {v}' for k, v in splits.items())})"
    if to == "webdataset":
        lines = [f"wrote {len(list(out.glob('*.tar')))} shard(s) to {out} ({size:.1f} MB): {what}, from {src.file}"]
        lines.append(f"next: crossmatch data validate {out}, then train with data.format=webdataset data.root={out}")
    else:
        lines = [f"wrote {out} ({to}, {size:.1f} MB): {what}, from {src.file} ({src.fmt})"]
        lines.append(f"image paths are relative to {src.image_dir}")
        lines.append(
            f"next: crossmatch data validate {out} --image-dir {src.image_dir}, then train with "
            f"data.format={to} data.root={Path(out).parent} data.json_name={Path(out).name} "
            f"data.image_dir={src.image_dir}"
        )
    return "\n".join(lines)


def shapes_summary(dataset: Path, negatives: Path) -> str:
    """What `data shapes` wrote (images and captions per split, size) and the next steps."""
    from collections import Counter

    from crossmatch.cli.demo import format_files
    from crossmatch.cli.train import folder_size
    from crossmatch.data.check import Source, read_entries

    entries = read_entries(Source("karpathy", dataset, dataset.parent / "images"))
    images, captions = Counter(e["split"] for e in entries), Counter()
    for e in entries:
        captions[e["split"]] += len(e["captions"])
    counts = ", ".join(f"{s} {images[s]} images / {captions[s]} captions" for s in images)
    root = dataset.parent
    lines = [f"wrote the shapes dataset to {root} ({folder_size(root) / 2**20:.1f} MB): {counts}"]
    lines.append(
        format_files(
            [
                ("annotations (Karpathy JSON + exact negatives)", dataset),
                ("test triples (image, caption, negative)", negatives),
                ("images", root / "images"),
            ]
        )
    )
    lines.append(f"next: crossmatch train configs/vse_shapes.yaml data.root={root}")
    return "\n".join(lines)


def people_summary(dataset: Path) -> str:
    """What `data people` wrote (identities, images, captions and twin pairs per split, size) and the next step."""
    from collections import Counter

    from crossmatch.cli.train import folder_size
    from crossmatch.data.check import Source, read_entries

    entries = read_entries(Source("cuhk_pedes", dataset, dataset.parent / "imgs"))
    ids, images, captions, twins = {}, Counter(), Counter(), Counter()
    for e in entries:
        ids.setdefault(e["split"], set()).add(e["pid"])
        images[e["split"]] += 1
        captions[e["split"]] += len(e["captions"])
        twins[e["split"]] += "twin_pid" in e
    counts = ", ".join(
        f"{s} {len(ids[s])} ids / {images[s]} images / {captions[s]} captions ({twins[s]} images of twins)" for s in ids
    )
    root = dataset.parent
    return (
        f"wrote the people dataset to {root} ({folder_size(root) / 2**20:.1f} MB): {counts}\n"
        f"next: crossmatch data validate {dataset}, then train with data.format=cuhk_pedes data.root={root}"
    )

"""`crossmatch export CHECKPOINT --onnx DIR [--towers] [--opset N] [--no-verify] [--verbose] [key=value ...]`:
the model's encoders as ONNX graphs for other runtimes (see `crossmatch.search.export` for the files and what
they hold).

Top-level imports stay light (no torch): this module is imported to build the parser of every command.
"""

from __future__ import annotations

import argparse

from crossmatch.cli.help import add_command


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction) -> None:
    e = add_command(
        sub,
        "export",
        "export a checkpoint's encoders (ONNX) for other runtimes",
        "crossmatch export runs/vse --onnx exported/",
        "crossmatch export runs/scan/checkpoints/best.pt --onnx exported/ --towers",
        "crossmatch export runs/tux --onnx exported/ model.cache_frozen=false --verbose",
    )
    e.add_argument("checkpoint", help="a .pt or .safetensors file, or a run folder")
    e.add_argument("--onnx", required=True, metavar="DIR", help="output folder: image_encoder.onnx, text_encoder.onnx")
    e.add_argument(
        "--towers", action="store_true", help="models that are not dual encoders: export their unimodal towers"
    )
    e.add_argument("--opset", type=int, default=18, help="ONNX opset")
    e.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-torch parity check")
    e.add_argument("--verbose", action="store_true", help="show torch.onnx's progress lines and warnings")
    e.add_argument(
        "overrides", nargs="*", help="dotted config overrides of the stored run, e.g. model.cache_frozen=false"
    )


def run(args: argparse.Namespace) -> bool:
    if args.command != "export":
        return False
    run_export(args.checkpoint, args.onnx, args.towers, args.opset, not args.no_verify, args.overrides, args.verbose)
    return True


def run_export(
    checkpoint: str,
    out: str,
    towers: bool = False,
    opset: int = 18,
    verify: bool = True,
    overrides: list[str] | None = None,
    verbose: bool = False,
) -> dict:
    """Export and print the files written and the measured parity."""
    from pathlib import Path

    from crossmatch.data.transforms import preprocess_kwargs
    from crossmatch.runs import load_run
    from crossmatch.search.export import MANIFEST, TOKENIZER_FILE, export_onnx, require_onnx

    require_onnx()  # fail before loading the checkpoint
    model, cfg, tokenizer = load_run(checkpoint, list(overrides or []))
    name, size = cfg.model["name"], cfg.data.image_size
    preprocess = preprocess_kwargs(cfg.data)  # the run's own mean/std/resize (a clip model's, say)
    kwargs = {"towers": towers, "opset": opset, "verify": verify, "preprocess": preprocess, "verbose": verbose}
    info = export_onnx(model, tokenizer, size, out, model_name=name, **kwargs)
    files = [info["image_encoder"]["file"], info["text_encoder"]["file"], TOKENIZER_FILE, MANIFEST]
    print(f"exported {cfg.model['name']} ({info['kind']}) to {Path(out)}: {', '.join(files)}")
    if "parity" in info:
        diff = info["parity"]["max_abs_diff"]
        print(f"onnxruntime vs torch, max abs diff: image {diff['image']:.2e}, text {diff['text']:.2e}")
    return info

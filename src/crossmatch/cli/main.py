"""The `crossmatch` command line: data | train | evaluate | search | models | features | index | demo.

Every command lives in a module of this package with `add_parsers(sub, data_sub)` (argparse sub-parser
groups of `crossmatch` and of `crossmatch data`) and `run(args) -> bool` (True when it handled the
command); `COMMAND_MODULES` lists them. Their top-level imports stay light (no torch), because every one
is imported to build the parser.

Errors in the user's input (CrossmatchError) print one line naming the culprit and exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from crossmatch import __version__
from crossmatch.cli.help import HelpFormatter, examples
from crossmatch.errors import CrossmatchError

COMMAND_MODULES: list[str] = [
    "crossmatch.cli.data_tools",
    "crossmatch.cli.train",
    "crossmatch.cli.commands",
    "crossmatch.cli.features",
    "crossmatch.cli.index",
    "crossmatch.cli.demo",
    "crossmatch.cli.export",
    "crossmatch.cli.serve",
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crossmatch",
        description="Image-text matching: train, evaluate, search.",
        formatter_class=HelpFormatter,
        epilog=examples("crossmatch demo", "crossmatch train configs/vse_shapes.yaml --run-dir runs/vse"),
    )
    p.add_argument("--version", action="version", version=f"crossmatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data = sub.add_parser(
        "data",
        help="create, check and convert datasets",
        description="create, check and convert datasets",
        formatter_class=HelpFormatter,
        epilog=examples("crossmatch data shapes --out data/shapes", "crossmatch data validate data/shapes"),
    ).add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub, data)
    return p


def _run(args: argparse.Namespace) -> int:
    for name in COMMAND_MODULES:
        if importlib.import_module(name).run(args):
            return 0
    raise AssertionError(f"no command module handles {args.command!r}")  # a parser without a runner


def passive_openmp_threads() -> None:
    """Let torch's OpenMP threads sleep, rather than spin, while they wait for work (OMP_WAIT_POLICY=PASSIVE),
    unless the environment says otherwise. GNU OpenMP reads this once, when torch is loaded, so it is set
    before any command imports torch. Spinning threads that the kernel deschedules stall every parallel op
    on a machine with more runnable threads than cores: on this project's shared 2-core machine (load 4-6)
    a training step of the demo took 3.1-3.8 s with the default policy and 0.84-0.89 s with PASSIVE
    (benchmarks/train_throughput.py --openmp)."""
    if "torch" not in sys.modules:  # in-process callers (tests) already hold their threads
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _drop_tracebacks(err: BaseException | None) -> None:
    """Free the frames of a handled error now. A DataLoader iterator held by them (an error from a loader
    worker) would otherwise live until the cyclic garbage collector, whose finaliser waits 5 s per worker;
    in-process callers (tests, notebooks) would pay that later, at random."""
    while err is not None:
        err.__traceback__ = None
        err = err.__cause__ or err.__context__


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, nothing run (argparse exits with status 2 on a bad one)."""
    parser = _parser()
    # Overrides may follow options (`train CFG --run-dir X a.b=1`): argparse leaves those to us.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if "=" not in e or e.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    passive_openmp_threads()
    args = parse_args(argv)
    try:
        return _run(args)
    except CrossmatchError as err:
        print(f"crossmatch: error: {err}", file=sys.stderr)
        _drop_tracebacks(err)
        return 2
    except KeyboardInterrupt as err:  # a WriteInterrupted names the file it left intact
        print(f"crossmatch: interrupted{': ' + str(err) if str(err) else ''}", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # commands that never load torch skip this
            from crossmatch.engine.distributed import teardown

            teardown()  # a process group is never left behind, whatever happened
        logging.shutdown()


if __name__ == "__main__":
    sys.exit(main())

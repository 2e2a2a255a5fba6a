"""Time `crossmatch demo` from nothing: data generation, training, test evaluation, gallery, curves.

    python benchmarks/demo.py                    # a fresh demo in a temporary folder (data generated there)
    python benchmarks/demo.py --out demo_out     # keep what it writes
    python benchmarks/demo.py --data data/shapes # reuse a generated dataset (skips the data phase's work)

Prints the demo's own output, then each phase's wall time, CPU time (this process and its children, all
cores) and the 1-minute load average at its end; the test metrics it reached. The demo's goal is 5 minutes
of wall time on an idle 2-core machine: on a shared machine, the load column says how idle it was (a
load of 4 on 2 cores leaves this run about half of them), and CPU time / wall time how many cores it got.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# OpenMP threads sleep while they wait, as under the `crossmatch` command (crossmatch.cli.main); set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from crossmatch.cli.demo import format_phases, run_demo  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for the data and the run (default: a temporary one)")
    p.add_argument("--data", default=None, help="an existing shapes dataset (default: generate one)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for the demo run")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print("load at start " + "/".join(f"{x:.1f}" for x in os.getloadavg()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        data = args.data or str(out / "shapes")
        phases = run_demo(data, str(out / "demo"), args.overrides)
        metrics = json.loads((out / "demo" / "test_metrics.json").read_text())
    print()
    print(format_phases(phases))
    keys = ("rsum", "twin_acc", "i2t_r1", "t2i_r1")
    print("test: " + "  ".join(f"{k} {metrics[k]:.1f}" for k in keys if k in metrics))


if __name__ == "__main__":
    main()

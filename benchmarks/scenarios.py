"""The project's failover scenario suite: every scenario, all three strategies, the
default three-channel configuration, written next to this file.

    python benchmarks/scenarios.py [--repayments N] [--seed N]

Writes benchmarks/results/bench.json and the plots in benchmarks/plots/ (the ones
benchmarks/README.md shows).  `failover bench` is the same engine for your own config.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from failover.bench import print_tables, run_bench, write_outputs

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repayments", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    results, data = run_bench(repayments=args.repayments, seed=args.seed,
                              progress=lambda s, k: print(f"  {s}/{k}", file=sys.stderr))
    print_tables(results, sys.stdout)
    out = HERE / "results"
    written = write_outputs(results, data, out)
    plots = HERE / "plots"
    plots.mkdir(exist_ok=True)
    for path in written:
        if path.suffix == ".png":
            shutil.copy(path, plots / path.name)
    print(f"{data['elapsed_s']:.1f} s; wrote {out / 'bench.json'} and {len(written) - 1} plots"
          f" in {plots}")


if __name__ == "__main__":
    main()

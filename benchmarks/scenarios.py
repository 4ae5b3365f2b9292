"""The project's failover scenario suite: every scenario, all its strategies, the
default three-channel configuration, written next to this file.

    python benchmarks/scenarios.py [SCENARIO ...] [--repayments N] [--seed N]

Writes benchmarks/results/bench.json and the plots in benchmarks/plots/ (the ones
benchmarks/README.md and the README show): one per scenario run, and the outcome bars
when every scenario ran.  `failover bench` is the same engine for your own config.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from failover.bench import SCENARIOS, print_tables, run_bench, write_outputs

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                        help=f"{' '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--repayments", type=int, default=2000, help="per simulated hour")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    results, data = run_bench(args.scenarios or None, repayments=args.repayments,
                              seed=args.seed,
                              progress=lambda s, k: print(f"  {s}/{k}", file=sys.stderr))
    print_tables(results, sys.stdout)
    out = HERE / "results"
    written = write_outputs(results, data, out)
    plots = HERE / "plots"
    plots.mkdir(exist_ok=True)
    every = set(results) == set(SCENARIOS)  # the outcome bars only from a full run
    copied = [path for path in written if path.suffix == ".png"
              and (every or path.stem in results)]
    for path in copied:
        shutil.copy(path, plots / path.name)
    print(f"{data['elapsed_s']:.1f} s; wrote {out / 'bench.json'} and {len(copied)} plots"
          f" in {plots}")


if __name__ == "__main__":
    main()

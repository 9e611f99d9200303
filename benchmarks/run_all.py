"""Run every benchmark, one after the other, and print their tables.

    python benchmarks/run_all.py            # every script in its default mode (8-9 min on 2 cores, cold compile cache)
    python benchmarks/run_all.py --quick    # every script with --quick (~3 min)
    python benchmarks/run_all.py --only train_step video_step

Each script writes its own JSON under benchmarks/results/; this prints the wall time of each.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ["train_step", "video_step", "attention", "sampling", "data", "shape3d", "patch_embed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="run only these")
    args = parser.parse_args()
    failed, walls = [], {}
    for name in args.only or SCRIPTS:
        command = [sys.executable, str(HERE / f"bench_{name}.py"), *(["--quick"] if args.quick else [])]
        print(f"\n## {name}: {' '.join(command[1:])}\n", flush=True)
        tic = time.perf_counter()
        if subprocess.run(command, check=False).returncode != 0:
            failed.append(name)
        walls[name] = time.perf_counter() - tic
    print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()) + f"; total {sum(walls.values()):.0f} s")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

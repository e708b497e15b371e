#!/usr/bin/env python3
"""Benchmark a preset: run `hw2.py` end to end on a validation split and append the figures
(date, hardware, command, accuracy, seconds per phase) to BENCHMARKS.md.

    python tools/bench.py --preset quick                      # this machine, 5000 val images
    python tools/bench.py --preset full --data-dir D --extra "--val-size 5000"
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--val-size", type=int, default=5000)
    ap.add_argument("--extra", default="", help="more hw2.py flags, one string")
    ap.add_argument("--results", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="hw2-bench-")
    cmd = [sys.executable, "hw2.py", "--preset", args.preset, "--val-size", str(args.val_size),
           "--output-dir", out] + (["--data-dir", args.data_dir] if args.data_dir else [])
    cmd += shlex.split(args.extra)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"bench: hw2.py failed with exit code {proc.returncode}")
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    hardware = m["device_name"]
    shown = " ".join(["python"] + [shlex.quote(c) for c in cmd[1:]]).replace(out, "OUT")
    if args.data_dir:
        shown = shown.replace(shlex.quote(args.data_dir), "D")
    row = (f"| {datetime.date.today()} | {args.preset} | {hardware} | torch {m['torch']} | "
           f"{m['n_train']}/{m['n_val']} | {m['epochs']} | {m['val_acc']:.4f} | "
           f"{m['seconds']['train']:.0f} | {wall:.0f} | `{shown}` | {args.note} |")
    header = ("| date | preset | hardware | software | train/val images | epochs | val acc (TTA) | "
              "train s | wall s (whole run) | command | note |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    new = not os.path.isfile(args.results)
    with open(args.results, "a") as f:
        if new:
            f.write("# Benchmarks\n\nAppended by `tools/bench.py` (`make bench`).\n\n" + header)
        f.write(row + "\n")
    print(row)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""BatchNorm statistics in short runs: one training run, evaluated twice on a 5k validation split,
with the running statistics training leaves (momentum 0.1, averaged by lookahead) and with the
statistics `hw2.recompute_bn_stats` computes for the final weights (BENCHMARKS.md).

    python tools/bn_stats_check.py --preset quick --epochs 2 --seed 0 --data-dir D
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hw2  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", required=True)
    a = ap.parse_args()
    hp = dict(hw2.PRESETS[a.preset])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = "fp16" if device == "cuda" else "fp32"
    x, y, _ = hw2.load_cifar_train(hw2.find_data_dir(a.data_dir, allow_download=False)[0])
    tx, ty, vx, vy = hw2.split_train_val(x, y, 5000)
    data = dict(train_x=tx, train_y=ty, val_x=vx, val_y=vy)
    cfg = argparse.Namespace(preset=a.preset, seed=a.seed, output_dir=tempfile.mkdtemp(), resume=False,
                             epochs=a.epochs, checkpoint_every=1e9)
    recompute, hw2.recompute_bn_stats = hw2.recompute_bn_stats, lambda *args, **kw: None  # train() skips it
    t0 = time.time()
    model, _ = hw2.train(data, hp, dict(device=device, precision=precision, compile=False), cfg, a.epochs,
                         hp["batch_size"], log=lambda s: None)
    acc = lambda tta: hw2.accuracy(hw2.predict_logits(model, vx, device, precision, tta=tta, batch_size=hp["batch_size"]), vy)
    before = acc(0), acc(hp["tta"])
    recompute(model, torch.from_numpy(tx).to(device), device, precision, min(hp["batch_size"], len(tx)), hp, a.seed)
    after = acc(0), acc(hp["tta"])
    steps = a.epochs * (len(tx) // min(hp["batch_size"], len(tx)))
    print(f"BN {a.preset} epochs {a.epochs} ({steps} steps) seed {a.seed} | val acc trailing stats "
          f"{before[0]:.4f} (TTA {hp['tta']}: {before[1]:.4f}) | recomputed {after[0]:.4f} "
          f"(TTA {hp['tta']}: {after[1]:.4f}) | {time.time() - t0:.0f} s on {device}", flush=True)


if __name__ == "__main__":
    main()

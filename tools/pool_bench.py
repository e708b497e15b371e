#!/usr/bin/env python3
"""Is there a cheaper 2x2 max-pool for hw2's nets? Forward + backward of each candidate at the
net's own pool sizes, timed alone, before anything in hw2.py changes.

    python tools/pool_bench.py [--presets fast,full] [--iters 50]

Why: on an H200 (2026-11-30, `tools/step_profile.py`) PyTorch's channels-last max-pool kernels
took 1.16 ms of `fast`'s ~5.8 ms training step (backward 0.74, forward 0.42), several times
what their bytes need at the card's bandwidth, and the kernels filled most of the step
(BENCHMARKS.md, 2026-11-30 second session): kernel time is what a step costs.

Each candidate computes the same forward values as `nn.MaxPool2d(2)`. They differ in how the
backward finds the maximum: PyTorch saves int64 indices in the forward; `mask` and `pair`
compare the input with the saved output, so tied maxima each get the gradient (a numerics change
that a real run must price in accuracy). Prints, per preset and candidate, milliseconds per
training step for the net's three pools at the sizes they see (31, 15 and 7 pixels: the 2x2 stem
has no padding, and an odd last row or column is dropped; batch 1024, fp16 on a GPU,
channels-last), whether the forward and the backward equal PyTorch's (on ties the backward
cannot), whether output and gradient stay channels-last, and the share of tied windows in the
data used (random normal values in the run's dtype; a real net's are others). On a machine
without a GPU it runs on the CPU at batch 64 in fp32 (plumbing, and the CPU's own answer: there
every candidate measured several times slower than PyTorch's on 2 Xeon cores, 2026-11-30).
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hw2  # noqa: E402


def windows(x):
    """(N, C, H, W) -> (N, C, H//2, 2, W//2, 2): each 2x2 window on dims 3 and 5, as a view. An
    odd last row or column belongs to no window (max_pool2d floors the output size, and the
    net's pools see 31, 15 and 7 pixels: its 2x2 stem has no padding)."""
    n, c, h, w = x.shape
    h2, w2 = h // 2, w // 2
    return x[:, :, :2 * h2, :2 * w2].unflatten(3, (w2, 2)).unflatten(2, (h2, 2))


class MaskPool(torch.autograd.Function):
    """Forward: amax over each window, written into a channels-last output (amax alone would
    return a contiguous one, and the next BatchNorm and conv would convert it back).
    Backward: the output's gradient where the input equals the window's maximum, else 0 (and 0
    on an odd last row or column), written straight into a channels-last gradient."""

    @staticmethod
    def forward(ctx, x):
        n, c, h, w = x.shape
        y = torch.empty(n, c, h // 2, w // 2, dtype=x.dtype, device=x.device,
                        memory_format=torch.channels_last)
        torch.amax(windows(x), dim=(3, 5), out=y)
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        gx = torch.empty_like(x, memory_format=torch.channels_last)
        if x.shape[2] % 2:
            gx[:, :, -1].zero_()
        if x.shape[3] % 2:
            gx[:, :, :, -1].zero_()
        hit = windows(x) == y[:, :, :, None, :, None]
        torch.where(hit, g[:, :, :, None, :, None], g.new_zeros(()), out=windows(gx))
        return gx


class PairPool(MaskPool):
    """Forward as two elementwise maxima over strided views (rows, then columns): elementwise
    kernels keep the input's channels-last layout; backward as MaskPool."""

    @staticmethod
    def forward(ctx, x):
        h2, w2 = x.shape[2] // 2, x.shape[3] // 2
        rows = torch.maximum(x[:, :, 0:2 * h2:2], x[:, :, 1:2 * h2:2])
        y = torch.maximum(rows[..., 0:2 * w2:2], rows[..., 1:2 * w2:2])
        ctx.save_for_backward(x, y)
        return y


CANDIDATES = {
    "torch": lambda x: F.max_pool2d(x, 2),
    "mask": MaskPool.apply,
    "pair": PairPool.apply,
}


def pool_shapes(widths):
    """(channels, pixels) at the input of each of hw2.Net's three max-pools, from the net itself."""
    net, seen = hw2.Net(widths), []
    for group in net.groups:
        group.pool.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[1:3])))
    with torch.no_grad():
        net(torch.zeros(1, 3, 32, 32))
    return seen


def timed(fn, xs, gs, iters, cuda):
    def step():  # autograd.grad, not backward(): no accumulation into x.grad, which no pool does
        for x, g in zip(xs, gs):
            torch.autograd.grad(fn(x), x, g)
    for _ in range(3):
        step()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="fast,full")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--batch", type=int, default=None, help="default 1024 on a GPU, 64 on the CPU")
    ap.add_argument("--min-save-ms", type=float, default=0.3,
                    help="a candidate passes if its forward equals PyTorch's and it saves this much a "
                         "training step (the rule in BENCHMARKS.md: 0.3 ms, ~5 %% of fast's step)")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    batch = a.batch or (1024 if cuda else 64)
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"POOL bench | {name} | torch {torch.__version__} | {dtype} | batch {batch} | median of {a.iters}")
    for preset in a.presets.split(","):
        widths = hw2.PRESETS[preset]["widths"]
        xs, gs = [], []
        for c, s in pool_shapes(widths):
            x = torch.randn(batch, c, s, s, device=dev, generator=gen).to(dtype)
            xs.append(x.contiguous(memory_format=torch.channels_last).requires_grad_())
            g = torch.randn(batch, c, s // 2, s // 2, device=dev, generator=gen).to(dtype)
            gs.append(g.contiguous(memory_format=torch.channels_last))
        ties = sum(int((windows(x.detach()) == F.max_pool2d(x.detach(), 2)[:, :, :, None, :, None])
                       .sum(dim=(3, 5)).gt(1).sum()) for x in xs)
        outs = sum(g.numel() for g in gs)
        ref = [(F.max_pool2d(x, 2), torch.autograd.grad(F.max_pool2d(x, 2), x, g)[0]) for x, g in zip(xs, gs)]
        base = None
        for cand, fn in CANDIDATES.items():
            got = [(fn(x), torch.autograd.grad(fn(x), x, g)[0]) for x, g in zip(xs, gs)]
            same_fwd = all(torch.equal(y, r[0]) for (y, _), r in zip(got, ref))
            same_bwd = all(torch.equal(d, r[1]) for (_, d), r in zip(got, ref))
            layout = all(t.is_contiguous(memory_format=torch.channels_last) for pair in got for t in pair)
            ms = timed(fn, xs, gs, a.iters, cuda)
            base = base or ms
            print(f"POOL {preset:5s} {cand:6s} | {ms:7.3f} ms/step ({ms / base:5.2f}x torch) | "
                  f"forward same {same_fwd} | backward same {same_bwd} | channels-last out and grad {layout} | "
                  f"tied windows {ties / outs:.2e}")
            if cand != "torch":  # one line a script can read (device_check's pooltune phase)
                ok = same_fwd and layout and base - ms >= a.min_save_ms
                print(f"POOL verdict {preset} {cand} {'pass' if ok else 'fail'} | saves {base - ms:.3f} ms/step "
                      f"(needs {a.min_save_ms}) | forward same {same_fwd} | channels-last {layout}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Where a training epoch's GPU time goes: hw2.train under torch.profiler, summed by kernel kind.

    python tools/step_profile.py --preset fast --data-dir D [--epochs 2] [--precision fp16] [--cold]

Runs `hw2.train` itself (the code a student runs, not a copy) twice in one process: once for one
epoch without the profiler, which pays the one-off costs (cuDNN autotuning, first kernel loads),
then for `--epochs` under torch.profiler. Prints one line per kernel kind (convolution, matmul,
BatchNorm, elementwise, foreach/optimizer, reduction, copy, index) with its GPU milliseconds per
training step and launches per step, the GPU's busy share of the wall time, the host-device
synchronisations per step, and the 12 costliest kernels. A busy share well below 100 % means
the host (Python, launches, syncs) holds the GPU back; near 100 % the kernels themselves do.
The profiler adds host time per op, so its wall time is an upper bound; the unprofiled epochs'
seconds are printed beside it. On a machine without a GPU it runs on the CPU (plumbing only).
`--cold` profiles the unprofiled first epoch too, with a first prediction after it: the host's
costliest calls in a fresh process (kernel loading, cuDNN set-up), where `fast` spends ~1.8 s
more than in a warm run (BENCHMARKS.md, 2026-11-30), and the hw2 functions behind host-device
copies and behind the device's copies and casts.
"""
import argparse
import collections
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import hw2  # noqa: E402

KINDS = [  # first match wins: (kind, substrings of the kernel's name, lower case). cuDNN runs
    # BatchNorm too, and both convolutions and matmuls are "xmma ... gemm" kernels on sm80+
    ("batchnorm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd", "fft")),
    ("matmul", ("gemm", "cublas", "bmm", "matmul", "cutlass")),
    ("foreach/optimizer", ("multi_tensor", "foreach", "amp_")),
    ("reduction", ("reduce",)),
    ("index/gather", ("index", "gather", "scatter")),
    ("copy/cast", ("copy", "cast", "memcpy", "memset", "fill", "nchwtonhwc", "nhwctonchw")),
    ("elementwise", ("elementwise", "gelu", "pool", "where", "softmax", "nll", "loss")),
    ("convolution", ("cudnn",)),  # cuDNN's other helpers
]
# host<->device copies (.to(device), .cpu()) and reads (.item()): hw2's call sites, counted. A
# blocking host-to-device copy makes the host wait for the GPU's queue to drain, like a sync
STACKED = ("aten::_to_copy", "aten::_local_scalar_dense")
# the ops behind copy/cast kernels on the device (casts, contiguous(), stacks): by hw2 function too
COPIES = ("aten::copy_", "aten::cat", "aten::_foreach_copy_", "aten::fill_")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def kind(name):
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other")


def device_us(evt):  # the attribute was renamed in torch 2.4
    return getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--data-dir", required=True, help="a folder holding cifar-10-batches-py")
    ap.add_argument("--epochs", type=int, default=2, help="epochs profiled (after one unprofiled)")
    ap.add_argument("--precision", default="auto", choices=hw2.PRECISIONS)
    ap.add_argument("--autotune", default="off", choices=hw2.ON_OFF)
    ap.add_argument("--cuda-graph", default="on", choices=hw2.ON_OFF, help="Muon's step from a CUDA graph")
    ap.add_argument("--n-train", type=int, default=None, help="fewer training images (plumbing checks)")
    ap.add_argument("--cold", action="store_true",
                    help="first profile the process's first train() (1 epoch) and first prediction: "
                         "where a fresh process's one-off seconds go")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    hw2.configure_determinism(False, a.autotune)
    precision = a.precision if a.precision != "auto" else "fp16" if cuda else "fp32"
    hw = dict(device="cuda" if cuda else "cpu", precision=precision, compile=False)
    hp = hw2.preset_hparams(a.preset, hw)
    x, y, _ = hw2.load_cifar_train(hw2.data_dir_folder(a.data_dir))
    n = a.n_train or len(x)
    data = dict(train_x=x[:n], train_y=y[:n], val_x=x[:0], val_y=y[:0])
    bs = min(hp["batch_size"], n)
    steps = a.epochs * (n // bs)
    out = tempfile.mkdtemp(prefix="hw2-profile-")

    def train(epochs):  # one hw2.train run from scratch: its model, per-epoch rows and wall seconds
        cfg = hw2.parse_config(["--preset", a.preset, "--epochs", str(epochs), "--output-dir", out,
                                "--autotune", a.autotune, "--cuda-graph", a.cuda_graph, "--checkpoint-every", "1e9"])
        t0 = time.time()
        model, history = hw2.train(data, hp, hw, cfg, epochs, bs, log=lambda s: None)
        if cuda:
            torch.cuda.synchronize()
        return model, history, time.time() - t0

    from torch._C._profiler import _ExperimentalConfig  # verbose: Python stacks on the ops
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    stacked = dict(with_stack=True, experimental_config=_ExperimentalConfig(verbose=True))
    if a.cold:  # the same first epoch as below, profiled: a fresh process's one-off costs
        images = x[:5000]
        with profile(activities=activities, **stacked) as cold:
            model, warm, t_warm = train(1)
            t0 = time.time()
            hw2.predict_logits(model, images, hw["device"], precision, tta=hp["tta"], batch_size=bs)
            t_pred = time.time() - t0
        print(f"COLD {a.preset}: first train() {t_warm:.2f} s (its epoch {warm[0]['seconds']:.2f} s), "
              f"first predict_logits {t_pred:.2f} s ({len(images)} images, TTA {hp['tta']}); profiled with "
              f"Python stacks, so slower than unprofiled. The host's costliest calls (self time, ops and "
              f"CUDA runtime/driver calls):")
        host_events = [e for e in cold.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
        for e in sorted(host_events, key=lambda e: -e.self_cpu_time_total)[:20]:
            print(f"  {e.self_cpu_time_total / 1e3:9.1f} ms  x{e.count:6d}  {e.key[:100]}")
        # host<->device copies and read-backs by hw2 function (a stack names each function's
        # `def` line, not the line inside it that made the call)
        stacked_events = cold.key_averages(group_by_stack_n=6)
        for keys, top in ((STACKED, 12), (COPIES, 16)):
            for e in sorted((e for e in stacked_events if e.key in keys), key=lambda e: -e.count)[:top]:
                where = " <- ".join(os.path.basename(f) for f in (e.stack or []) if "hw2.py" in f)
                print(f"  {e.key} x{e.count:5d} in the cold part, in {where[:300] or '(no hw2 frame)'}")
    else:
        _, warm, t_warm = train(1)
    _, plain, t_plain = train(a.epochs)
    with profile(activities=activities) as prof:  # no stacks: its busy share compares across days
        _, _, t_prof = train(a.epochs)
    events = prof.key_averages()
    kernels = [e for e in events if cuda and e.device_type == torch.autograd.DeviceType.CUDA and device_us(e) > 0]
    gpu_ms = sum(device_us(e) for e in kernels) / 1e3
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"PROFILE {a.preset} | {name} | torch {torch.__version__} | {precision} | autotune {a.autotune} | cuda graph {a.cuda_graph} | "
          f"{n} images, batch {bs}, {a.epochs} epochs = {steps} steps")
    print(f"{'profiled (--cold)' if a.cold else 'unprofiled'}: first process epoch {warm[0]['seconds']:.2f} s "
          f"(one-off costs; train() {t_warm:.1f} s) | "
          f"warm epochs {' '.join('%.3f' % r['seconds'] for r in plain)} s (train() {t_plain:.2f} s)")
    print(f"profiled train(): {t_prof:.2f} s wall (profiler overhead included) | GPU kernels {gpu_ms / 1e3:.2f} s "
          f"= {100 * gpu_ms / 1e3 / t_prof:.0f} % busy" if cuda else f"profiled train(): {t_prof:.2f} s (CPU)")
    by_kind = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        k = by_kind[kind(e.key)]
        k[0] += device_us(e) / 1e3
        k[1] += e.count
    for k, (ms, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"  {k:<18} {ms / steps:8.3f} ms/step {100 * ms / max(gpu_ms, 1e-9):5.1f} %  {count / steps:7.1f} launches/step")
    host = {e.key: e.count for e in events if e.device_type == torch.autograd.DeviceType.CPU}
    launches = sum(c for k, c in host.items() if "LaunchKernel" in k or k == "cuLaunchKernel")
    syncs = {k: c for k, c in host.items() if any(k.startswith(s) for s in SYNCS)}
    print(f"host: {launches / steps:.1f} kernel launches/step | syncs/step: "
          + (", ".join(f"{k} {c / steps:.2f}" for k, c in sorted(syncs.items())) or "none"))
    top = sorted(kernels, key=lambda e: -device_us(e))[:12]
    for e in top:
        print(f"  {device_us(e) / 1e3 / steps:8.3f} ms/step  x{e.count / steps:5.1f}  [{kind(e.key)}] {e.key[:110]}")
    # the most-launched kernels, and of the copy/cast kind (2026-11-30: 174 copy/cast launches a
    # step, ~45 of them accounted for without a card: BENCHMARKS.md)
    for e in sorted(kernels, key=lambda e: -e.count)[:8]:
        print(f"  most launched: x{e.count / steps:5.1f}/step {device_us(e) / 1e3 / steps:7.3f} ms/step  [{kind(e.key)}] {e.key[:100]}")
    for e in sorted((e for e in kernels if kind(e.key) == "copy/cast"), key=lambda e: -e.count)[:10]:
        print(f"  copy/cast: x{e.count / steps:5.1f}/step {device_us(e) / 1e3 / steps:7.3f} ms/step  {e.key[:120]}")
    if not cuda:  # the CPU: the ops that cost the most host time, for the plumbing check
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:5]:
            print(f"  {e.self_cpu_time_total / 1e3 / steps:8.3f} ms/step  x{e.count / steps:5.1f}  {e.key[:110]}")
    print(f"median warm epoch {statistics.median(r['seconds'] for r in plain):.3f} s")


if __name__ == "__main__":
    main()

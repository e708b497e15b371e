"""Shared fixtures: the repo on sys.path, a subprocess runner for hw2.py, real CIFAR-10 batches."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, ROOT)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The Ctrl-C tests send hw2.py a real SIGINT, as a terminal does. A shell starts a background job
# (`make test &`) with SIGINT ignored, children inherit that, and Python then never raises
# KeyboardInterrupt: here the handler is Python's own again, and every child starts as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def killed_after_first_save(monkeypatch, train):
    """Run `train()` with hw2.save_torch raising KeyboardInterrupt right after its first save
    (Kaggle killing the session after epoch 1's checkpoint); the real save is back afterwards."""
    import hw2
    real = hw2.save_torch

    def save_then_die(path, obj):
        real(path, obj)
        raise KeyboardInterrupt

    monkeypatch.setattr(hw2, "save_torch", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(hw2, "save_torch", real)


@pytest.fixture
def no_hw2_env(monkeypatch):
    """In-process calls read HW2_* variables: start the test without any (returns monkeypatch)."""
    for k in [k for k in os.environ if k.startswith("HW2_")]:
        monkeypatch.delenv(k)
    return monkeypatch


def cifar_with_test_batch(tiny, dst):
    """A copy of the tiny cifar-10-batches-py folder under dst, with a labelled test_batch (a
    copy of data_batch_1) as CIFAR-10's own folder has."""
    import shutil
    folder = dst / "cifar-10-batches-py"
    shutil.copytree(tiny, folder)
    shutil.copy(folder / "data_batch_1", folder / "test_batch")
    return folder


def run_hw2(*args, env=None, timeout=600, cwd=None):
    """Run `python hw2.py ARGS` as a user would; returns the CompletedProcess (text)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HW2_")}
    full_env.update({"PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"})
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "hw2.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd or ROOT)


def _cpu_has(op):
    """Does this torch run `op` on the CPU? The tests drive the GPU's fp16 paths on the CPU, and
    the oldest torch requirements.txt admits (2.3) lacks some of their CPU kernels; the GPU has them."""
    import torch
    try:
        op(torch)
        return True
    except RuntimeError:  # NotImplementedError included
        return False


def _fused_sgd_step(torch):
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    torch.optim.SGD([p], lr=0.1, fused=True).step()


CPU_FUSED_SGD = _cpu_has(_fused_sgd_step)
# what fp16 training on the CPU needs and this torch lacks (2.3.1: both; 2.14.1: neither)
CPU_FP16_MISSING = [name for name, ok in (
    ("fused SGD", CPU_FUSED_SGD),
    ("fp16 reflection padding", _cpu_has(lambda torch: torch.nn.functional.pad(
        torch.zeros(1, 1, 4, 4, dtype=torch.half), (1,) * 4, mode="reflect")))) if not ok]
needs_cpu_fused_sgd = pytest.mark.skipif(
    not CPU_FUSED_SGD, reason="this torch has no CPU kernel for fused SGD (hw2 uses it on CUDA only, in fp16 runs)")
needs_cpu_fp16 = pytest.mark.skipif(
    bool(CPU_FP16_MISSING),
    reason=f"this torch has no CPU kernel for {' or '.join(CPU_FP16_MISSING)} (hw2 trains in fp16 on CUDA only)")

CPU = dict(device="cpu", precision="fp32", compile=False)  # the hardware plan hw2.train reads


def sgd_kilo(momentum):
    """The divisor from the presets' per-1024-examples lr/wd to PyTorch SGD's, restated from the
    airbench convention hw2.make_optimizer follows: 1024 * (1 + 1/(1 - momentum))."""
    return 1024 * (1 + 1 / (1 - momentum))


def train_cfg(tmp_path, **kw):
    """The config `hw2.train` reads, for calling it directly (smoke preset, checkpoint every epoch)."""
    import argparse
    base = dict(preset="smoke", seed=0, output_dir=str(tmp_path), resume=False, epochs=None,
                checkpoint_every=0.0, deterministic=False, autotune="off")
    base.update(kw)
    return argparse.Namespace(**base)


def train_data(n_train=320, n_val=64, seed=0):
    """Synthetic train/val arrays in the layout `hw2.load_data` returns."""
    import hw2
    x, y = hw2.synthetic_cifar(n_train + n_val, seed=seed)
    return dict(train_x=x[:n_train], train_y=y[:n_train], val_x=x[n_train:], val_y=y[n_train:])


def quiet(line):
    """A `log` for `hw2.train` that prints nothing."""


def state_equal(a, b):
    """Two state dicts hold the same keys and bitwise-equal tensors."""
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """The real training batches made from ../shared's JPEG copy (skipped without it, CI fails)."""
    archive = os.path.join(SHARED, "cifar10-jpeg-train.tar.gz")
    script = os.path.join(SHARED, "make_cifar_batches.py")
    if not os.path.isfile(archive):
        if IN_CI:
            pytest.fail(f"CI=true but {archive} is missing")
        pytest.skip(f"real data not available here ({archive} missing)")
    out = tmp_path_factory.mktemp("cifar")
    subprocess.run([sys.executable, script, archive, str(out)], check=True, capture_output=True)
    return os.path.join(str(out), "cifar-10-batches-py")


@pytest.fixture(scope="session")
def tiny_cifar_dir(tmp_path_factory):
    """A small, valid cifar-10-batches-py folder written in the official pickle layout."""
    root = tmp_path_factory.mktemp("tiny") / "cifar-10-batches-py"
    root.mkdir()
    g = np.random.default_rng(0)
    for i in range(1, 6):
        write_cifar_batch(root / f"data_batch_{i}", g, 200)
    return str(root)


def write_cifar_batch(path, g, n):
    """n random images and labels from generator g, pickled in the official batch layout."""
    import pickle
    data = g.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in g.integers(0, 10, n)]
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"b", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}, f)

#!/usr/bin/env python3
"""hw2's train + predict, several times in ONE process, as the harness runs airbench.

    python tools/warm_runs.py --preset fast --data-dir SPLIT [--seeds 0,0,1,2]
    python tools/warm_runs.py --preset full --data-dir FULL50K --val-size 5000 --seeds 0,1,2,3 \
        --variant "" --variant muon_lr=0.06 --variant "epochs=28 muon_lr=0.1"

`run_anchor.py` times airbench's runs one after another in one process, and the harness reports
their median: a warm run, after the first has paid the process's one-off costs (kernel loading,
cuDNN and cuBLAS set-up, airbench's autotuning). `hw2.py` runs once per process, so each of its
figures is a cold run. This tool measures hw2 the way the harness measures airbench: the same
calls as `hw2.py`'s main path (train(), the model.pt save, TTA prediction, the checked and
atomically written submission.csv, on the training images in hw2.py's order), timed the same
way, repeated in one process: a seed's submission.csv is byte for byte hw2.py's. The first line
is the cold run; the rest are warm. SPLIT is the harness's split folder (its `test_batch` holds
the 5k held-out images). Each line also prints the sha256 of the submission, so the same seed
twice in one process checks determinism too.

Tuning (issue #7 asks to tune on our own split, not the harness's): with `--val-size N` the
images come from DATA_DIR's training batches (the 50k), split as `hw2.py --val-size N` splits them,
and each run predicts its N held-out images instead of a test batch (`smoke` aside: hw2.py first
cuts its data to a few hundred images). Each `--variant` (space-separated `key=value` overrides of
the preset's hyperparameters; "" is the preset itself) runs every seed, in one process, seed by
seed with the variants interleaved: a warm run costs about half a fresh `hw2.py` process, so a
lease holds twice the runs. A summary line per variant gives its mean accuracy over distinct
seeds, its mean difference from the first variant on the same seeds (paired: same seed, same
images, same order) and on how many it scored lower, and its warm seconds against the first's;
`--json PATH` writes those figures and every run (tools/device_summary.py applies the rules).

For a preset that recounts its BatchNorm statistics on augmented images (`bn_augmented`: `full`),
each run's weights are also scored with the clean recount, outside the timed window: the paired
figure device_summary's BatchNorm rule reads (`acc_clean_bn`, the variant's `bn_gain`).

One variant key is the tool's own, not a hyperparameter: `pool=NAME` trains and predicts with the
net's three max-pools replaced by `tools/pool_bench.py`'s candidate NAME (mask, pair; torch is
PyTorch's own), so that a candidate whose kernels measured faster is priced end to end, in time
and in accuracy (it gives a tied window's gradient to every tied input), before hw2.py changes.
"""
import ast
import argparse
import contextlib
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import hw2  # noqa: E402
import pool_bench  # noqa: E402


def parse_variant(text, hp):
    """'muon_lr=0.06 widths=(128,384,512)' -> {'muon_lr': 0.06, 'widths': (128, 384, 512)}; keys
    must be the preset's, or `pool` (a candidate's name: the tool's own key, see the docstring)."""
    out = {}
    for part in text.split():
        key, sep, value = part.partition("=")
        if key == "pool" and sep:
            if value not in pool_bench.CANDIDATES:
                sys.exit(f"warm_runs: --variant {text!r}: pool={value!r} is not one of {sorted(pool_bench.CANDIDATES)}")
            out[key] = value
            continue
        if not sep or key not in hp:
            sys.exit(f"warm_runs: --variant {text!r}: {part!r} is not KEY=VALUE with KEY one of "
                     f"{sorted(hp) + ['pool']}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            sys.exit(f"warm_runs: --variant {text!r}: {value!r} is not a Python literal")
    return out


class CandidatePool(nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name, self.fn = name, pool_bench.CANDIDATES[name]

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self):
        return self.name


@contextlib.contextmanager
def pools(name):
    """Inside: hw2.Net (which train() builds) has the candidate `name` as its three max-pools."""
    if name == "torch":
        yield
        return
    original = hw2.Net

    class PooledNet(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for group in self.groups:
                group.pool = CandidatePool(name)

    hw2.Net = PooledNet
    try:
        yield
    finally:
        hw2.Net = original


def one_run(data, test, hp, hw, preset, seed, epochs):
    out = tempfile.mkdtemp(prefix="hw2-warm-")
    # hw2.py's own settings for these flags (every other flag at its default)
    cfg = hw2.parse_config(["--preset", preset, "--seed", str(seed), "--epochs", str(epochs), "--output-dir", out])
    t0 = time.time()  # as hw2.py: train (with its checkpoint) + the model.pt save
    model, history = hw2.train(data, hp, hw, cfg, epochs, hp["batch_size"], log=lambda s: None)
    hw2.save_torch(os.path.join(out, "model.pt"),
                   hw2.model_record(model, cfg, hp, history, hp["batch_size"], data, precision=hw["precision"]))
    t_train = time.time() - t0
    t0 = time.time()  # as hw2.py: TTA prediction + the checked, atomically written submission.csv
    pred = hw2.predict_logits(model, test[0], hw["device"], hw["precision"], tta=hp["tta"],
                              batch_size=hp["batch_size"]).argmax(1).numpy()
    path = os.path.join(out, "submission.csv")
    hw2.write_submission(path, hw2.make_submission(pred))
    t_predict = time.time() - t0
    row = dict(seed=seed, acc=float((pred == test[1]).mean()), train=t_train, predict=t_predict,
               first_epoch=history[0]["seconds"], sha=hw2.sha256_file(path),
               pool=getattr(model.groups[0].pool, "name", "torch"))  # what really ran, not what was asked
    if hp.get("bn_augmented"):
        row["acc_clean_bn"] = clean_bn_accuracy(model, data, test, hp, hw)
    shutil.rmtree(out)  # checkpoint.pt, model.pt: up to ~100 MB a run for `full`
    return row


def clean_bn_accuracy(model, data, test, hp, hw):
    """The accuracy of the same weights with the BatchNorm recount on clean training images (what
    hw2.py did before 2026-11-30; it now recounts on augmented ones), outside the timed window:
    device_summary's BatchNorm rule compares the two, paired on every run."""
    clean = copy.deepcopy(model)  # eval mode, recounted on augmented images by train()
    images = torch.from_numpy(data["train_x"]).to(hw["device"])
    hw2.recompute_bn_stats(clean, images, hw["device"], hw["precision"], min(hp["batch_size"], len(images)))
    logits = hw2.predict_logits(clean, test[0], hw["device"], hw["precision"], tta=hp["tta"],
                                batch_size=hp["batch_size"])
    return hw2.accuracy(logits, test[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--data-dir", required=True,
                    help="the harness's split (cifar-10-batches-py with test_batch), or with --val-size "
                         "any folder of training batches (the 50k)")
    ap.add_argument("--seeds", default="0,0,1,2", help="one run per entry, in this order, in one process")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--n-train", type=int, default=None, help="fewer training images (plumbing checks)")
    ap.add_argument("--val-size", type=int, default=0,
                    help="tune: hold out this many of DATA_DIR's training images (hw2.py's split) and "
                         "score them, instead of the test batch")
    ap.add_argument("--variant", action="append", default=None, metavar="KEY=VALUE ...",
                    help="hyperparameter overrides, repeatable; each runs every seed (default: the preset)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write every run and each variant's figures there (device_check's rules read it)")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    hw2.configure_determinism(False, "off")
    hw = dict(device="cuda" if cuda else "cpu", precision="fp16" if cuda else "fp32", compile=False)
    if not cuda:  # as hw2.py: the threads it may use (a thread count can change CPU results' last bits)
        torch.set_num_threads(hw2.usable_cpus())
    hp = hw2.preset_hparams(a.preset, hw)
    variants = [(text or "preset", parse_variant(text, hp)) for text in a.variant or [""]]
    labels = [label for label, _ in variants]
    if len(set(labels)) < len(labels):  # their results would be merged under one label
        sys.exit(f"warm_runs: a --variant is given twice: {labels}")
    x, y, test = hw2.load_cifar_train(hw2.data_dir_folder(a.data_dir))
    # hw2.py's own order and split: load_data permutes the training images even when it holds none out
    x, y, vx, vy = hw2.split_train_val(x, y, a.val_size)
    if a.val_size:
        test = (vx, vy)
    elif test is None:
        sys.exit(f"warm_runs: {a.data_dir} has no test_batch to predict (or pass --val-size)")
    n = a.n_train or len(x)
    data = dict(train_x=x[:n], train_y=y[:n], val_x=x[:0], val_y=y[:0])
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    scored = "val" if a.val_size else "test"
    # seed by seed, every variant in turn: a drift over the process (clocks, allocator) is shared
    # by all variants instead of landing on the last; the first run (cold) is the first variant's
    runs = [(label, over, int(seed)) for seed in a.seeds.split(",") for label, over in variants]
    rows = []  # every run: its figures, its variant, and whether it was warm
    for i, (label, over, seed) in enumerate(runs):
        hpv = dict(hp, **{k: v for k, v in over.items() if k != "pool"})
        epochs = over.get("epochs") or a.epochs or hpv["epochs"]  # a variant's own epochs win
        with pools(over.get("pool", "torch")):
            r = one_run(data, test, hpv, hw, a.preset, seed, epochs)
        r = dict(r, label=label, run=i, warm=i > 0)  # the first run of the process pays its one-off costs
        rows.append(r)
        print(f"WARM {a.preset} [{label}] run {i} ({'cold' if i == 0 else 'warm'}) seed {r['seed']} | "
              f"{name} | torch {torch.__version__} | {scored} acc {r['acc']:.4f} | train {r['train']:.2f} s "
              f"+ predict {r['predict']:.2f} s = {r['train'] + r['predict']:.2f} s | first epoch "
              f"{r['first_epoch']:.2f} s | pool {r['pool']} | "
              + (f"clean-BN acc {r['acc_clean_bn']:.4f} | " if "acc_clean_bn" in r else "") + f"sha {r['sha'][:12]}",
              flush=True)
    cold = rows[0]["train"] + rows[0]["predict"]
    warm = [r["train"] + r["predict"] for r in rows if r["warm"]]
    if warm:
        print(f"WARM {a.preset} summary | cold {cold:.2f} s | warm median {statistics.median(warm):.2f} s "
              f"over {len(warm)} runs")
    stats = [dict(v, overrides=dict(variants)[v["label"]]) for v in compare(rows)]
    for v in stats:
        print(f"WARM {a.preset} variant [{v['label']}] | {scored} acc mean {v['mean']:.4f} over seeds {v['seeds']} | "
              f"vs the first variant {v['paired']:+.4f} (paired over {v['n_paired']} seeds, worse on {v['worse']}) | "
              f"warm train + predict median {v['warm_median']:.2f} s ({v['time_ratio']:.3f}x the first variant's)"
              + (f" | augmented vs clean BN recount {v['bn_gain']:+.4f} (same weights, worse on {v['bn_worse']})"
                 if "bn_gain" in v else ""))
    if a.json:  # for device_summary's rules: the same figures, not parsed back out of the lines above
        hw2.write_json(a.json, dict(preset=a.preset, device=name, torch=torch.__version__, scored=scored,
                                    seeds=a.seeds, cold=cold, runs=rows, variants=stats))


def compare(rows):
    """Per variant (in the order of the runs): mean accuracy over its distinct seeds (a repeated
    seed counts once, its last run); the mean paired difference from the first variant and on how
    many of those seeds it scored lower; the mean gain of the augmented BatchNorm recount over the
    clean one on the same weights and on how many seeds it scored lower; its warm runs' median
    train + predict seconds and their ratio to the first variant's (nan where a variant has no
    warm run)."""
    nan = float("nan")
    by_variant, seconds, bn = {}, {}, {}
    for r in rows:
        by_variant.setdefault(r["label"], {})[r["seed"]] = r["acc"]
        if "acc_clean_bn" in r:  # augmented minus clean BatchNorm statistics, on the same weights
            bn.setdefault(r["label"], {})[r["seed"]] = r["acc"] - r["acc_clean_bn"]
        if r["warm"]:
            seconds.setdefault(r["label"], []).append(r["train"] + r["predict"])
    med = {label: statistics.median(ts) for label, ts in seconds.items()}
    first_label = next(iter(by_variant))
    first = by_variant[first_label]
    out = []
    for label, accs in by_variant.items():
        diffs = [accs[s] - first[s] for s in accs if s in first]
        out.append(dict(label=label, mean=statistics.mean(accs.values()), seeds=sorted(accs),
                        paired=statistics.mean(diffs), n_paired=len(diffs), worse=sum(d < 0 for d in diffs),
                        warm_median=med.get(label, nan),
                        time_ratio=med.get(label, nan) / med.get(first_label, nan)))
        if label in bn:  # a preset that recounts on augmented images (bn_augmented)
            gains = bn[label].values()
            out[-1].update(bn_gain=statistics.mean(gains), bn_worse=sum(d < 0 for d in gains))
    return out


if __name__ == "__main__":
    main()

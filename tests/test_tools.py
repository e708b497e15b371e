"""The measuring tools' own logic: a candidate max-pool computes what nn.MaxPool2d does, and a
tuning variant is parsed into the preset's keys or refused with one line."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import hw2
from conftest import ROOT


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cand", ["mask", "pair"])
@pytest.mark.parametrize("hw", [(8, 6), (31, 31), (15, 7)])  # the net's pools see 31, 15 and 7
def test_pool_candidates_match_max_pool(cand, hw):
    pool = _tool("pool_bench").CANDIDATES[cand]
    h, w = hw
    # distinct values (a permutation): no window has a tie, so the backward must match exactly
    x = torch.randperm(2 * 5 * h * w).float().view(2, 5, h, w).contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 5, h // 2, w // 2).contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, ref = pool(a), F.max_pool2d(b, 2)
    assert torch.equal(y, ref) and y.is_contiguous(memory_format=torch.channels_last)
    y.backward(g)
    ref.backward(g)
    assert torch.equal(a.grad, b.grad) and a.grad.is_contiguous(memory_format=torch.channels_last)


def test_pool_shapes_are_the_nets():
    bench = _tool("pool_bench")
    assert bench.pool_shapes((64, 256, 256)) == [(64, 31), (256, 15), (256, 7)]


def test_mask_pool_gives_every_tied_maximum_the_gradient():
    pool = _tool("pool_bench").CANDIDATES["mask"]
    x = torch.tensor([[[[1.0, 3.0], [3.0, 2.0]]]]).requires_grad_()  # two maxima in one window
    pool(x).backward(torch.tensor([[[[5.0]]]]))
    assert x.grad.tolist() == [[[[0.0, 5.0], [5.0, 0.0]]]]  # PyTorch's would give one of them 5


def test_tune_variant_parsing():
    warm = _tool("warm_runs")
    hp = hw2.PRESETS["full"]
    assert warm.parse_variant("", hp) == {}
    assert warm.parse_variant("muon_lr=0.11  widths=(128,384,512)", hp) == dict(muon_lr=0.11, widths=(128, 384, 512))
    with pytest.raises(SystemExit, match="'foo=1' is not KEY=VALUE"):
        warm.parse_variant("foo=1", hp)
    with pytest.raises(SystemExit, match="'x' is not a Python literal"):
        warm.parse_variant("lr=x", hp)


def test_pool_variant_parsing():
    warm = _tool("warm_runs")
    hp = hw2.PRESETS["fast"]
    assert warm.parse_variant("pool=mask muon_lr=0.2", hp) == dict(pool="mask", muon_lr=0.2)
    with pytest.raises(SystemExit, match="pool='max' is not one of"):
        warm.parse_variant("pool=max", hp)


def test_pool_variant_swaps_the_nets_pools_for_the_run_only():
    warm = _tool("warm_runs")
    torch.manual_seed(0)
    ref = hw2.Net((8, 16, 16)).to(memory_format=torch.channels_last)
    with warm.pools("mask"):
        net = hw2.Net((8, 16, 16)).to(memory_format=torch.channels_last)  # what train() builds
    assert [type(g.pool).__name__ for g in net.groups] == ["CandidatePool"] * 3
    assert all(isinstance(g.pool, torch.nn.MaxPool2d) for g in hw2.Net((8, 16, 16)).groups)  # restored
    net.load_state_dict(ref.state_dict())  # the same weights: pools hold none
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    ref.train(), net.train()
    a, b = ref(x), net(x)
    assert torch.equal(a, b)  # random floats: no tied window, so the candidate is PyTorch's pool
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(ref.named_parameters(), net.parameters()):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


def test_pool_bench_verdict_lines(capsys, monkeypatch):
    """One verdict line per candidate, which device_check's pooltune phase reads: pass only with
    the saving the rule asks for (thresholds no timing can straddle, so the test is not timed)."""
    bench = _tool("pool_bench")

    def verdicts(min_save):
        monkeypatch.setattr("sys.argv", ["pool_bench.py", "--presets", "smoke", "--iters", "1", "--batch", "2",
                                         f"--min-save-ms={min_save}"])
        bench.main()
        return [line.split()[2:5] for line in capsys.readouterr().out.splitlines()
                if line.startswith("POOL verdict")]

    assert verdicts(1e9) == [["smoke", "mask", "fail"], ["smoke", "pair", "fail"]]
    assert verdicts(-1e9) == [["smoke", "mask", "pass"], ["smoke", "pair", "pass"]]


def test_warm_runs_compare_pairs_seeds_and_times():
    warm = _tool("warm_runs")
    acc = {"preset": {0: 0.90, 1: 0.92, 2: 0.91}, "b": {0: 0.91, 1: 0.91, 2: 0.93}}
    seconds = {"preset": [9.9, 2.0, 2.2], "b": [2.1, 2.3, 2.2]}  # the preset's first run is the cold one
    clean = {0: 0.89, 1: 0.93, 2: 0.90}  # the preset's weights recounted on clean images (b recounts clean)
    rows = [dict(label=label, seed=seed, acc=acc[label][seed], train=seconds[label][seed] - 0.5, predict=0.5,
                 warm=(label, seed) != ("preset", 0), **({"acc_clean_bn": clean[seed]} if label == "preset" else {}))
            for seed in range(3) for label in ("preset", "b")]
    base, b = warm.compare(rows)
    assert (base["paired"], base["worse"], base["time_ratio"]) == (0.0, 0, 1.0)
    assert base["bn_gain"] == pytest.approx(0.01 / 3) and base["bn_worse"] == 1  # +1, -1, +1 %
    assert "bn_gain" not in b
    assert b["paired"] == pytest.approx(0.02 / 3) and (b["worse"], b["n_paired"]) == (1, 3)
    assert b["warm_median"] == pytest.approx(2.2) and b["time_ratio"] == pytest.approx(2.2 / 2.1)


def _rules(tmp_path, phase, variants, device="NVIDIA H200", base_label="preset"):
    import json
    base = dict(label=base_label, mean=0.92, paired=0.0, n_paired=4, worse=0, warm_median=13.5, time_ratio=1.0,
                overrides={})
    (tmp_path / f"{phase}.json").write_text(json.dumps(dict(
        preset="full", scored="val", seeds="0,1,2,3", device=device, variants=[base] + variants)))
    lines = _tool("device_summary").rules(str(tmp_path))
    return {line.split("]")[0].strip(" ["): line for line in lines if line.startswith("  [")}, lines


def test_tune_rule_adopts_only_a_clear_gain_in_time(tmp_path):
    v = dict(mean=0.923, n_paired=4, warm_median=13.5, worse=0, time_ratio=1.0, overrides={})
    # +0.2 % as warm_runs computes it: 10 more of 5,000 images right on each of 4 seeds
    edge = sum([4690 / 5000 - 4680 / 5000] * 4) / 4
    assert edge < 0.002  # the float mean lands below the threshold it equals
    got, _ = _rules(tmp_path, "tune", [
        dict(v, label="good", paired=0.003, worse=1),
        dict(v, label="edge", paired=edge),
        dict(v, label="longer", paired=0.003, time_ratio=1.07, overrides=dict(epochs=28)),
        dict(v, label="small", paired=0.0015),
        dict(v, label="mixed", paired=0.004, worse=2),
        dict(v, label="few", paired=0.004, n_paired=3),
        dict(v, label="slow", paired=0.005, time_ratio=1.09, overrides=dict(epochs=28)),
        dict(v, label="untimed", paired=0.005, time_ratio=float("nan"), overrides=dict(epochs=28)),
        dict(v, label="lr", paired=0.003, time_ratio=1.2),  # the time test binds only a change of epochs
    ])
    for label in ("good", "edge", "longer", "lr"):
        assert "ADOPT" in got[label], got[label]
    for label in ("small", "mixed", "few", "slow", "untimed"):
        assert "KEEP the preset" in got[label], got[label]
    assert "worse on 2 seeds <= 1: NO" in got["mixed"] and "no warm run" in got["untimed"]


def test_warm_runs_clean_bn_accuracy_is_the_clean_recounts_own(tmp_path, monkeypatch):
    """The recount runs after training and draws from a generator of its own, so the same seed
    trains the same weights either way: warm_runs' clean-recount accuracy of an augmented run must
    be the accuracy of the run trained with the clean recount, and leave the model as it was."""
    from conftest import CPU, quiet, state_equal, train_cfg, train_data
    warm = _tool("warm_runs")
    data = train_data(n_train=320, n_val=64)
    test = (data["val_x"], data["val_y"])
    models = {}
    for augmented in (True, False):
        hp = dict(hw2.PRESETS["smoke"], bn_augmented=augmented)
        os.makedirs(tmp_path / str(augmented))
        models[augmented] = hw2.train(data, hp, CPU, train_cfg(tmp_path / str(augmented)), 2, 32, log=quiet)[0]
    before = {k: v.clone() for k, v in models[True].state_dict().items()}
    scored = []  # the model warm_runs scores: its weights and statistics must be the clean twin's
    predict = hw2.predict_logits
    monkeypatch.setattr(hw2, "predict_logits", lambda m, *a, **kw: scored.append(
        {k: v.clone() for k, v in m.state_dict().items()}) or predict(m, *a, **kw))
    got = warm.clean_bn_accuracy(models[True], data, test, hp, CPU)
    monkeypatch.undo()
    assert len(scored) == 1 and state_equal(scored[0], models[False].state_dict())
    assert not state_equal(before, models[False].state_dict())  # the twins differ in their statistics
    clean = hw2.accuracy(hw2.predict_logits(models[False], test[0], "cpu", "fp32", tta=hp["tta"], batch_size=32), test[1])
    assert got == clean
    assert state_equal(before, models[True].state_dict())  # the augmented run's model is left as it was


def test_bn_rule_keeps_the_augmented_recount_unless_the_card_says_it_loses(tmp_path):
    def verdict(gain, n=4, device="NVIDIA H200", preset="full"):
        import json
        base = dict(label="preset", mean=0.92, paired=0.0, n_paired=n, worse=0, warm_median=13.5, time_ratio=1.0,
                    overrides={}, bn_gain=gain, bn_worse=1)
        (tmp_path / "tune.json").write_text(json.dumps(dict(preset=preset, scored="val", seeds="0,1,2,3",
                                                            device=device, variants=[base])))
        return [x for x in _tool("device_summary").rules(str(tmp_path)) if "[BatchNorm recount]" in x]

    assert "KEEP the augmented" in verdict(0.004)[0]
    assert "KEEP the augmented" in verdict(sum([4680 / 5000 - 4680 / 5000] * 4) / 4)[0]  # level: kept
    assert "REVERT to the clean recount (full's bn_augmented=False)" in verdict(-0.0002)[0]
    # the verdict names the preset the tune phase ran (TUNE_PRESET), not full's alone
    assert "REVERT to the clean recount (smoke's bn_augmented=False)" in verdict(-0.0002, preset="smoke")[0]
    assert "KEEP the augmented" in verdict(-1e-12)[0]  # a float mean of zero gains may land a hair below 0
    assert "no verdict" in verdict(-0.01, n=3)[0] and "no verdict" in verdict(-0.01, device="CPU")[0]
    assert "worse on 1 seeds" in verdict(0.004)[0]
    (tmp_path / "tune.json").unlink()
    # a tune.json from before the BatchNorm figures (no bn_gain): no line, no crash
    _, lines = _rules(tmp_path, "tune", [])
    assert not any("[BatchNorm recount]" in x for x in lines)


def test_rules_give_no_verdict_on_a_cpu_or_without_the_preset_first(tmp_path):
    v = dict(mean=0.93, n_paired=4, warm_median=13.5, worse=0, time_ratio=1.0, overrides={}, paired=0.01)
    got, _ = _rules(tmp_path, "tune", [dict(v, label="b")], device="CPU")
    assert "KEEP" in got["b"] and "on a GPU: NO" in got["b"]
    got, lines = _rules(tmp_path, "tune", [dict(v, label="preset")], base_label="b")
    assert not got and any("no verdicts" in line for line in lines)


def test_pooltune_rule_wants_the_kernel_test_no_loss_and_no_slowdown(tmp_path):
    (tmp_path / "pool.txt").write_text("POOL verdict fast mask pass | saves 0.5\nPOOL verdict fast pair fail | x\n"
                                      "POOL verdict full pair pass | y\n")
    v = dict(mean=0.91, n_paired=4, worse=2, warm_median=2.3)
    got, _ = _rules(tmp_path, "pooltune", [
        dict(v, label="pool=mask", paired=-0.001, time_ratio=0.96, overrides=dict(pool="mask")),
        dict(v, label="pool=pair", paired=0.0, time_ratio=0.9, overrides=dict(pool="pair")),  # failed at fast's pools
        dict(v, label="mask lossy", paired=-0.003, time_ratio=0.9, overrides=dict(pool="mask")),
        dict(v, label="mask slow", paired=0.002, time_ratio=1.01, overrides=dict(pool="mask")),
    ])
    assert "ADOPT into hw2.py for fast" in got["pool=mask"]
    assert "passed pool's kernel test in this call: NO" in got["pool=pair"]
    assert "KEEP" in got["mask lossy"] and "KEEP" in got["mask slow"]


@pytest.mark.parametrize("val_size", [0, 200])
def test_warm_runs_writes_hw2s_own_bytes(tmp_path, tiny_cifar_dir, val_size):
    """warm_runs.py restates hw2.py's main path (train, the model.pt save, TTA prediction, the
    checked submission.csv) so as to time it warm in one process: what it measures must be what
    hw2.py does. A seed's submission must match hw2.py's byte for byte, on the harness's layout
    (a test_batch beside the training batches, none held out) and on the tuning split
    (--val-size N scores the N images hw2.py's split holds out: hw2.py predicts the same images
    when they are handed to it as test.npy). Fails if either side changes its data order, split,
    preset or prediction without the other; on the CPU, in fp32 (the GPU's fp16 path runs the
    same code, but no test compares the two there)."""
    import json
    import shutil
    import subprocess
    import sys

    import numpy as np

    from conftest import run_hw2, write_cifar_batch

    folder = tmp_path / "data" / "cifar-10-batches-py"
    shutil.copytree(tiny_cifar_dir, folder)
    write_cifar_batch(folder / "test_batch", np.random.default_rng(1), 100)
    # quick, 1 epoch (fp32 on the CPU, as warm_runs runs there): 1 step of 512 at 16/64/128
    args = ["--preset", "quick", "--precision", "fp32", "--epochs", "1", "--seed", "3", "--skip-answers",
            "--data-dir", tmp_path / "data", "--val-size", val_size, "--output-dir", tmp_path / "hw2"]
    if val_size:
        x, y, _ = hw2.load_cifar_train(str(folder))
        np.save(tmp_path / "val.npy", hw2.split_train_val(x, y, val_size)[2])
        args += ["--test-npy", tmp_path / "val.npy"]
    r = run_hw2(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    want = json.loads((tmp_path / "hw2" / "metrics.json").read_text())["submission_sha256"]
    w = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "warm_runs.py"), "--preset", "quick",
                        "--data-dir", str(tmp_path / "data"), "--seeds", "3", "--epochs", "1",
                        "--val-size", str(val_size), "--json", str(tmp_path / "warm.json")],
                       capture_output=True, text=True, timeout=600)
    assert w.returncode == 0, w.stderr[-2000:]
    (run,) = json.loads((tmp_path / "warm.json").read_text())["runs"]
    assert (run["sha"], run["seed"], run["pool"]) == (want, 3, "torch")


def test_device_check_refuses_an_unknown_phase_before_any_work(tmp_path):
    """A misspelt (or retired) phase in PHASES would be skipped in silence, and with it the
    card's minutes: the script stops before it writes or removes anything (an earlier call's
    results stay), and its list of phases is the set it runs."""
    import re
    import subprocess

    script = os.path.join(ROOT, "tools", "device_check.sh")
    text = open(script).read()
    known = set(re.search(r'KNOWN_PHASES="([^"]+)"', text).group(1).split())
    ran = set(re.findall(r'^(?:if|elif) phase ([a-z0-9]+) ', text, re.M))
    assert known == ran, (known ^ ran)
    env = dict(os.environ, PHASES="preflight fastepochs", DRY="1", OUT=str(tmp_path / "out"), W=str(tmp_path / "w"))
    r = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "unknown phase 'fastepochs'" in r.stdout, r.stdout + r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "w").exists()  # nothing written or removed


def test_device_summary_splits_a_fresh_processs_train_time(tmp_path, capsys):
    import json

    ds = _tool("device_summary")
    m = dict(device_name="NVIDIA H200", torch="2.11", preset="fast", seed=0, epochs=7, test_acc=0.91,
             history=[dict(seconds=0.95)] + [dict(seconds=0.28)] * 6, checkpoint=dict(saves=1, seconds=0.05),
             seconds=dict(train=3.2, predict=0.3, train_cuda_init=0.25, train_setup=0.15))
    (tmp_path / "metrics.json").write_text(json.dumps(m))
    ds.run("fast_s0", str(tmp_path / "metrics.json"), "0", "0", "--preset fast")
    row = json.loads(capsys.readouterr().out)
    parts = ds.train_parts(row)
    assert parts == pytest.approx(dict(prewarm_wait=0.0, cuda_init=0.25, setup=0.15, first_epoch=0.95,
                                       later_epochs=1.68, checkpoints=0.05, rest=0.12))
    assert sum(parts.values()) == pytest.approx(row["train_s"])
    one = dict(m, history=m["history"][:1])  # one epoch: no later ones, not a rounding remainder
    (tmp_path / "metrics.json").write_text(json.dumps(one))
    ds.run("fast_s0", str(tmp_path / "metrics.json"), "0", "0", "--preset fast")
    assert ds.train_parts(json.loads(capsys.readouterr().out))["later_epochs"] == 0.0
    line = ds.parts_line([row, dict(row, predict_s=0.5)])
    assert "cuda init 0.25 + setup 0.15" in line and "rest 0.12 s" in line and "predict 0.40 s" in line
    # with --prewarm on: the wait for the thread is a part of its own, not the rest
    pw = dict(m, seconds=dict(m["seconds"], train_prewarm_wait=0.08, train_cuda_init=0.01),
              prewarm=dict(seconds=0.4, waited=0.08, error=None))
    (tmp_path / "metrics.json").write_text(json.dumps(pw))
    ds.run("fast_s0_prewarm", str(tmp_path / "metrics.json"), "0", "0", "--preset fast --prewarm on")
    pw_row = json.loads(capsys.readouterr().out)
    assert pw_row["prewarm"] == pw["prewarm"]
    assert ds.train_parts(pw_row) == pytest.approx(dict(parts, prewarm_wait=0.08, cuda_init=0.01, rest=0.28))
    # a metrics.json from before the parts were recorded: no split, no line
    old = {k: v for k, v in row.items() if k not in ("cuda_init_s", "setup_s", "later_epochs_s")}
    assert ds.train_parts(old) is None and ds.parts_line([old]) is None
    # a --resume'd run: its history holds an earlier process's epochs, more than its train time
    resumed = dict(row, later_epochs_s=row["later_epochs_s"] + 1.0)
    assert ds.train_parts(resumed) is None and ds.parts_line([resumed, row]).endswith("(mean of 1 fresh processes)")


def test_prewarm_rule_wants_the_same_bytes_and_a_gain_on_every_seed():
    ds = _tool("device_summary")
    THREAD = dict(seconds=0.4, waited=0.0, error=None)

    def run(name, t, sha="a", data=0.5, thread=THREAD):
        """A run whose data + train + predict take `t` s (data `data`, predict 0.3)."""
        return dict(name=name, data_s=data, train_s=t - data - 0.3, predict_s=0.3, sha256=sha, cuda_init_s=0.0,
                    prewarm_wait_s=0.0, prewarm=thread if name.endswith("_prewarm") else None)

    def verdict(on_times, off_times=(3.4, 3.2, 3.3), extra=(), **kw):
        runs = [run("fast_s0_det", 1.0)]  # other runs of the call are no pair
        for s, (off, on) in enumerate(zip(off_times, on_times)):
            runs += [run(f"fast_s{s}", off, sha=f"sha{s}"), run(f"fast_s{s}_prewarm", on, **dict(dict(sha=f"sha{s}"), **kw))]
        lines = ds.prewarm_rule(runs + list(extra))
        return lines[-1]

    assert verdict((3.0, 2.9, 3.1)).startswith("ADOPT: --prewarm on by default")
    # exactly +0.1 s on average, as floats compute it
    assert verdict((3.3, 3.1, 3.2)).startswith("ADOPT"), verdict((3.3, 3.1, 3.2))
    small = verdict((3.35, 3.15, 3.25))
    assert small.startswith("KEEP --prewarm off") and "mean gain +0.050 s >= 0.1 s: NO" in small
    mixed = verdict((2.6, 3.3, 3.1))  # a large mean from one seed, slower on another
    assert mixed.startswith("KEEP") and "faster on every seed (+0.80, -0.10, +0.20 s): NO" in mixed
    # seconds moved from training into the data load are no gain: 0.4 s less train + predict on
    # every seed, 0.4 s more data load, the same span
    moved = verdict((3.4, 3.2, 3.3), data=0.9)
    assert moved.startswith("KEEP") and "faster on every seed (+0.00, +0.00, +0.00 s): NO" in moved
    assert "the same submission.csv bytes on every seed: NO" in verdict((3.0, 2.9, 3.1), sha="other")
    for thread in (None, dict(THREAD, error="RuntimeError: CUDA error: x"), dict(THREAD, seconds=None)):
        assert "the thread ran without error in every --prewarm on run: NO" in verdict((3.0, 2.9, 3.1), thread=thread)
    # an off run with the thread (a default flipped, or HW2_PREWARM in the environment): no
    # comparison. The row is a later one of the same name: the last row of a name is the one read
    both = verdict((3.0, 2.9, 3.1), extra=[dict(run("fast_s1", 3.2, sha="sha1"), prewarm=THREAD)])
    assert both.startswith("KEEP") and "and in no off run: NO" in both
    assert "paired over 2 seeds >= 3: NO" in verdict((3.0, 2.9))
    # a pair's last row failed (a crash in this call, even after a good row from an earlier call): KEEP
    crashed = verdict((3.0, 2.9, 3.1), extra=[dict(name="fast_s2_prewarm", failed=True)])
    assert crashed == "KEEP --prewarm off: no run of the pairs failed: NO (fast_s2_prewarm)"
    assert ds.prewarm_rule([run("fast_s0", 3.0)]) == []  # no pairs: no block


def test_device_summary_keeps_prewarm_runs_out_of_item_3s_sample(tmp_path, capsys):
    """The fast phase's --prewarm on runs (fast_sN_prewarm) are an arm of their own: item 3's
    verdict and the preset's mean are the default's runs, and the other arm gets its own lines."""
    import json

    ds = _tool("device_summary")
    base = dict(device="NVIDIA H200", torch="2.11", preset="fast", optimizer="muon", widths=[64, 256, 256], epochs=7,
                predict_s=0.3, first_epoch_s=0.9, later_epochs_s=1.7, cuda_init_s=0.3, setup_s=0.1,
                checkpoint=dict(seconds=0.02), whole_s=16.0, tflops_train=90, tflops_epoch=150, fp16_scale=None,
                deterministic=False, compile=False, later_epoch_s=0.28, flops_run=2.9e14)
    runs = [dict(base, name=f"fast_s{s}", seed=s, acc=0.91, train_s=3.1, sha256=f"h{s}") for s in range(3)]
    runs += [dict(base, name=f"fast_s{s}_prewarm", seed=s, acc=0.91, train_s=2.6, sha256=f"h{s}", prewarm_wait_s=0.05, first_epoch_s=0.5,
                  cuda_init_s=0.0, prewarm=dict(seconds=0.5, waited=0.05, error=None)) for s in range(3)]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    (tmp_path / "log").write_text("ANCHOR airbench94.py | NVIDIA H200 | torch 2.11 | runs 3 | acc mean 0.9041 sd 0.0022 "
                                  "| wall s per run 6.7 2.0 2.0 | median 2.0\n")
    ds.summary(str(tmp_path / "runs.jsonl"), str(tmp_path / "log"))
    out = capsys.readouterr().out.splitlines()
    item3 = [x for x in out if x.startswith("item 3")]
    assert item3[0].startswith("item 3: fast acc 0.9100 vs airbench94.py 0.9041: MET | train+predict 3.4 s vs 1.5x")
    assert "NOT MET (1.70x" in item3[0] and item3[0].endswith("n=3")
    assert item3[1].startswith("item 3 with --prewarm on: fast acc") and "3.0 s: MET (1.45x" in item3[1]
    assert any(x.startswith("fast: n=3 ") for x in out) and any(x.startswith("fast --prewarm on: n=3 ") for x in out)
    assert any(x.startswith("  fast --prewarm on: train = prewarm wait 0.05 + cuda init 0.00") for x in out)
    assert any(x.startswith("ADOPT: --prewarm on by default") for x in out)

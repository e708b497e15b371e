"""--resume and --predict-only on the smoke preset, all starting from one finished 2-epoch run."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import hw2
from conftest import CPU, killed_after_first_save, quiet, run_hw2, train_cfg, train_data

FILES = ("submission.csv", "answers.json", "metrics.json", "model.pt", "checkpoint.pt")
HEADER = re.compile(r"^ *epoch +train_loss +train_acc +val_acc +lr +seconds$", re.M)
EPOCH_LINE = re.compile(r"^ *(\d+) +-?\d+\.\d{4} +\d\.\d{4} +(?:-|\d\.\d{4}) +-?\d+\.\d{5} +\d+\.\d{2}$",
                        re.M)


def epoch_lines(stdout):
    """The per-epoch table rows (printed after the header)."""
    m = HEADER.search(stdout)
    return [] if m is None else [x.group(0) for x in EPOCH_LINE.finditer(stdout, m.end())]


def smoke(out, data_dir, test_npy, *args, answers=False):
    """The script on the smoke preset; Problems 1-3 (~10 s, no part of what these tests check
    after the base run) only with answers=True."""
    return run_hw2("--preset", "smoke", "--output-dir", out, "--data-dir", data_dir,
                   "--test-npy", test_npy, *args, *([] if answers else ["--skip-answers"]), timeout=400)


def ok(res):
    both = res.stdout + res.stderr
    assert res.returncode == 0, both[-3000:]
    assert "Traceback" not in both, both[-3000:]


def failed(res, *needles):
    both = res.stdout + res.stderr
    assert res.returncode != 0, both[-3000:]
    assert "Traceback" not in both, both[-3000:]
    errs = [line for line in res.stderr.splitlines() if line.startswith("hw2: error: ")]
    assert len(errs) == 1, res.stderr[-3000:]
    for n in needles:
        assert str(n) in errs[0], f"{n!r} not in {errs[0]!r}"
    return errs[0]


def read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_cifar_dir):
    """One finished smoke run (2 epochs) with a 50-image test.npy; tests work on copies of it."""
    d = tmp_path_factory.mktemp("base")
    test_npy = str(d / "test.npy")
    np.save(test_npy, np.random.default_rng(5).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8))
    out = d / "out"
    res = smoke(out, tiny_cifar_dir, test_npy, "--epochs", "2", answers=True)  # as a user runs it
    return dict(res=res, out=out, test_npy=test_npy, data=tiny_cifar_dir)


@pytest.fixture
def run_copy(base, tmp_path):
    """A private copy of the base run's output dir."""
    ok(base["res"])
    out = tmp_path / "out"
    shutil.copytree(base["out"], out)
    return out


def test_base_run_positive_control(base):
    ok(base["res"])
    out = base["out"]
    for name in FILES:
        assert (out / name).is_file(), name
    sub = pd.read_csv(out / "submission.csv")
    assert list(sub.columns) == ["Id", "Category"]
    assert sub["Id"].tolist() == list(range(50))
    assert sub["Category"].between(0, 9).all()
    assert [int(line.split()[0]) for line in epoch_lines(base["res"].stdout)] == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and len(metrics["history"]) == 2 and metrics["n_test"] == 50
    # the CPU kind decides precision and epochs, so the run records it (issue #10)
    known = hw2.cpu_native_bf16()  # None where torch cannot tell (2.3): auto takes fp32 there
    native, speedup = bool(known), metrics["cpu"]["bf16_speedup"]
    assert (speedup is not None) is native  # measured only where bf16 is native
    assert (metrics["seconds"]["precision"] > 0.05) is native  # ... and its seconds are reported
    # the train time's parts: no CUDA context on the CPU; the set-up, the epochs and the
    # checkpoints within it, the rest (BatchNorm recount, model.pt) what is left
    sec, ckpt = metrics["seconds"], metrics["checkpoint"]["seconds"]
    assert sec["train_cuda_init"] == 0.0 and sec["train_setup"] > 0
    assert sec["train_setup"] + sum(r["seconds"] for r in metrics["history"]) + ckpt <= sec["train"] + 0.01
    # --resume and --predict-only read the precision back instead of measuring again
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["precision"] == metrics["precision"]
    for flag in ("resume", "predict_only"):
        cfg = hw2.parse_config(["--output-dir", str(out), f"--{flag.replace('_', '-')}"])
        assert hw2.saved_precision(cfg) == metrics["precision"], flag
    other = "fp32" if saved["precision"] == "bf16" else "bf16"  # --predict-only's model.pt as already read: not read again
    assert hw2.saved_precision(cfg, model_pt=dict(saved, precision=other)) == other
    assert hw2.saved_precision(hw2.parse_config(["--output-dir", str(out)])) is None  # a new run
    assert metrics["precision"] == ("bf16" if native and speedup >= hw2.BF16_MIN_SPEEDUP else "fp32")
    assert metrics["cpu"]["native_bf16"] is known and metrics["cpu"]["name"] == hw2.cpu_name()
    assert metrics["cpu"]["isa"] == torch.backends.cpu.get_cpu_capability()
    assert metrics["cpu"]["threads"] == hw2.usable_cpus()  # the CPUs it may use, not the host's
    # model.pt keeps the net's shape, which --predict-only rebuilds (quick's differs in fp32)
    saved = torch.load(out / "model.pt", weights_only=True)
    assert (tuple(saved["widths"]), tuple(saved["residual"])) == \
        (hw2.PRESETS["smoke"]["widths"], hw2.PRESETS["smoke"]["residual"])
    # ... and the split it trained on, which --predict-only checks before it scores a hold-out
    assert (saved["n_train"], saved["val_size"]) == (metrics["n_train"], metrics["n_val"])
    assert metrics["n_val"] > 0 and metrics["val_acc"] is not None


def test_resume_after_last_epoch_trains_nothing(base, run_copy):
    res = smoke(run_copy, base["data"], base["test_npy"], "--resume", "--epochs", "2")
    ok(res)
    assert "resumed from" in res.stdout and str(run_copy / "checkpoint.pt") in res.stdout
    # the table is the first run's, reprinted, and no new epoch is trained
    assert epoch_lines(res.stdout) == epoch_lines(base["res"].stdout)
    assert len(epoch_lines(res.stdout)) == 2
    metrics = json.loads((run_copy / "metrics.json").read_text())
    base_metrics = json.loads((base["out"] / "metrics.json").read_text())
    assert metrics["history"] == base_metrics["history"]
    # the resumed model is the finished one: same predictions
    assert read(run_copy / "submission.csv") == read(base["out"] / "submission.csv")


def test_same_seed_twice_is_byte_identical_and_recorded(base, tmp_path):
    # A second run with the same seed (and --deterministic, which on the CPU must change nothing)
    # writes the same bytes, and metrics.json records the hash to check a reproduction against.
    import hashlib
    ok(base["res"])
    out = tmp_path / "again"
    # the precision the base run chose, pinned: auto's bf16 timing must not be what differs
    precision = json.loads((base["out"] / "metrics.json").read_text())["precision"]
    res = smoke(out, base["data"], base["test_npy"], "--epochs", "2", "--deterministic",
                "--precision", precision)
    ok(res)
    assert read(out / "submission.csv") == read(base["out"] / "submission.csv")
    first, again = (json.loads((d / "metrics.json").read_text()) for d in (base["out"], out))
    assert first["submission_sha256"] == again["submission_sha256"] == \
        hashlib.sha256(read(out / "submission.csv")).hexdigest()
    assert (first["deterministic"], again["deterministic"]) == (False, True)
    assert first["seed"] == again["seed"] == 0 and first["torch"] == torch.__version__


KILL_AFTER_FIRST_CHECKPOINT = """
import os, runpy, signal, sys
real_replace = os.replace
def replace_then_ctrl_c(src, dst, *a, **k):
    real_replace(src, dst, *a, **k)
    if os.path.basename(dst) == "checkpoint.pt":  # Kaggle ends the session right after the save
        os.replace = real_replace
        os.kill(os.getpid(), signal.SIGINT)
os.replace = replace_then_ctrl_c
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_killed_after_its_first_checkpoint_then_resumed_writes_the_same_bytes(base, tmp_path):
    # The course's rule end to end, through the script: a run stopped by a real Ctrl-C right
    # after epoch 1's checkpoint, then `--resume`d, writes the uninterrupted run's submission.csv.
    ok(base["res"])
    first = json.loads((base["out"] / "metrics.json").read_text())
    out, killer = tmp_path / "out", tmp_path / "kill_after_first_checkpoint.py"
    killer.write_text(KILL_AFTER_FIRST_CHECKPOINT)
    # the precision the base run chose, pinned: auto's bf16 timing must not be what differs
    args = ["--preset", "smoke", "--output-dir", out, "--data-dir", base["data"], "--test-npy",
            base["test_npy"], "--epochs", "2", "--precision", first["precision"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HW2_")}
    killed = subprocess.run([sys.executable, str(killer), hw2.__file__, *map(str, args),
                             "--checkpoint-every", "0"], capture_output=True, text=True,
                            timeout=400, env={**env, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"})
    assert killed.returncode != 0 and "Traceback" not in killed.stderr, killed.stderr[-3000:]
    assert "hw2: interrupted" in killed.stderr and "--resume" in killed.stderr
    assert [int(line.split()[0]) for line in epoch_lines(killed.stdout)] == [1]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0  # mid-run
    assert not (out / "submission.csv").exists()
    res = smoke(out, base["data"], base["test_npy"], "--epochs", "2", "--resume",
                "--precision", first["precision"])
    ok(res)
    assert "resumed from" in res.stdout
    assert epoch_lines(res.stdout)[:1] == epoch_lines(killed.stdout)  # epoch 1 reprinted, 2 trained
    assert [int(line.split()[0]) for line in epoch_lines(res.stdout)] == [1, 2]
    assert read(out / "submission.csv") == read(base["out"] / "submission.csv")
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["submission_sha256"] == first["submission_sha256"]


def test_a_write_that_fails_after_the_submission_leaves_no_stale_metrics(base, run_copy):
    # A second run (another seed) into the first one's folder fails at a figure, after its new
    # model.pt and submission.csv: the first run's metrics.json, whose submission_sha256 names the
    # old file, must not be left beside them; a run that fails before them keeps it (resume_*).
    (run_copy / "test_predictions.png").unlink()
    (run_copy / "test_predictions.png").mkdir()  # the rename onto it fails: a system error
    res = smoke(run_copy, base["data"], base["test_npy"], "--epochs", "2", "--seed", "1")
    failed(res, run_copy / "test_predictions.png", "cannot write")
    assert read(run_copy / "submission.csv") != read(base["out"] / "submission.csv")  # the new one
    assert read(run_copy / "model.pt") != read(base["out"] / "model.pt")
    assert not (run_copy / "metrics.json").exists()


def test_resume_with_other_epochs_is_refused_clearly(base, run_copy):
    # The lr schedule (warm-up, decay to 0 at the last step) is a function of the total epochs,
    # so a checkpoint only continues the run it came from; a longer run must start afresh.
    before = {name: read(run_copy / name) for name in FILES}
    res = smoke(run_copy, base["data"], base["test_npy"], "--epochs", "3", "--resume")
    failed(res, run_copy / "checkpoint.pt", "another run")
    assert "(epochs 2 there, 3 here)" in res.stderr  # the field that differs, and only it
    assert "train_loss" not in res.stdout
    assert {name: read(run_copy / name) for name in FILES} == before


def test_resume_from_another_runs_checkpoint_fails(base, run_copy):
    # refused before Problems 1-3 spend their ~10 s (answers=True: the script as a user runs it)
    before = {name: read(run_copy / name) for name in FILES}
    res = smoke(run_copy, base["data"], base["test_npy"], "--resume", "--epochs", "2", "--seed", "1",
                answers=True)
    failed(res, run_copy / "checkpoint.pt", "another run (seed 0 there, 1 here)")
    assert "Problem 1" not in res.stdout and "train_loss" not in res.stdout, res.stdout[-2000:]
    assert {name: read(run_copy / name) for name in FILES} == before  # nothing overwritten


@pytest.mark.parametrize("case", ["checkpoint_tensor", "checkpoint_is_model"])
def test_resume_refuses_a_damaged_checkpoint_before_problems(base, run_copy, case):
    name, make, phrase = DAMAGED[case]
    assert name == "checkpoint.pt"
    ck, m = (torch.load(run_copy / f, weights_only=True) for f in ("checkpoint.pt", "model.pt"))
    torch.save(make(ck, m), run_copy / name)
    res = smoke(run_copy, base["data"], base["test_npy"], "--resume", "--epochs", "2", answers=True)
    failed(res, run_copy / name, phrase)
    assert "Problem 1" not in res.stdout, res.stdout[-2000:]


def test_resume_pre_check_agrees_with_the_identity_train_records(tmp_path):
    # resume_conflicts compares, before Problems 1-3, the identity fields the flags alone fix; it
    # must take every run train() would resume (each flag given) and refuse each field changed
    argv = ["--preset", "smoke", "--seed", "3", "--epochs", "1", "--widths", "8,8,16",
            "--optimizer", "muon", "--deterministic", "--output-dir", str(tmp_path)]
    cfg = hw2.parse_config(argv)
    cfg.checkpoint_every = 0.0
    hp = hw2.preset_hparams("smoke", CPU, cfg.optimizer, cfg.widths)
    hw2.train(train_data(), hp, CPU, cfg, cfg.epochs, 32, log=quiet)
    path = str(tmp_path / "checkpoint.pt")
    saved = hw2.load_checkpoint(path)
    hw2.resume_conflicts(hw2.parse_config(argv + ["--resume"]), saved, path)  # the same run: taken
    hw2.train(train_data(), hp, CPU, hw2.parse_config(argv + ["--resume"]), 1, 32, log=quiet)  # as train() does
    for flags, change in [(["--seed", "4"], "seed 3 there, 4 here"), (["--epochs", "2"], "epochs 1 there, 2 here"),
                          (["--widths", "8,8,8"], "widths [8, 8, 16] there, [8, 8, 8] here"),
                          (["--optimizer", "sgd"], "optimizer muon there, sgd here")]:
        with pytest.raises(hw2.HW2Error, match=re.escape(f"another run ({change}): rerun")):
            hw2.resume_conflicts(hw2.parse_config(argv + flags + ["--resume"]), saved, path)
    no_det = [a for a in argv if a != "--deterministic"]
    with pytest.raises(hw2.HW2Error, match=re.escape("(deterministic True there, False here)")):
        hw2.resume_conflicts(hw2.parse_config(no_det + ["--resume"]), saved, path)
    # flags left out (preset's epochs, widths, optimizer): compared in train(), not here
    hw2.resume_conflicts(hw2.parse_config(["--seed", "3", "--deterministic", "--resume"]), saved, path)


def test_resume_without_checkpoint_fails(base, tmp_path):
    out = tmp_path / "out"
    res = smoke(out, base["data"], base["test_npy"], "--resume")
    failed(res, out / "checkpoint.pt", "does not exist")
    assert "train_loss" not in res.stdout
    assert not out.exists()  # created by the run, removed when it failed


def test_predict_only_rewrites_the_same_submission(base, run_copy):
    (run_copy / "submission.csv").unlink()
    model_before, ckpt_before = read(run_copy / "model.pt"), read(run_copy / "checkpoint.pt")
    res = smoke(run_copy, base["data"], base["test_npy"], "--predict-only")
    ok(res)
    assert re.search(r"^loaded .*model\.pt \(trained 2 epochs\): no training$", res.stdout, re.M), res.stdout
    assert "train_loss" not in res.stdout and epoch_lines(res.stdout) == []
    assert read(run_copy / "submission.csv") == read(base["out"] / "submission.csv")
    assert read(run_copy / "model.pt") == model_before
    assert read(run_copy / "checkpoint.pt") == ckpt_before
    # the same split as the training run: its hold-out is scored, to the same accuracy
    assert "no validation accuracy" not in res.stdout
    after, first = (json.loads((d / "metrics.json").read_text()) for d in (run_copy, base["out"]))
    assert after["val_acc"] == first["val_acc"] is not None


def test_predict_only_times_the_prediction_apart_from_the_load(base, run_copy, tmp_path):
    """seconds.predict is the prediction's own timer: on --predict-only the train phase is the
    net built from model.pt (milliseconds for smoke's net; the file itself is read before Problems
    1-3, within seconds.total), the predict phase TTA over 2,000 images."""
    big = tmp_path / "big.npy"
    np.save(big, np.random.default_rng(7).integers(0, 256, (2000, 32, 32, 3), dtype=np.uint8))
    res = smoke(run_copy, base["data"], big, "--predict-only")
    ok(res)
    sec = json.loads((run_copy / "metrics.json").read_text())["seconds"]
    assert len(pd.read_csv(run_copy / "submission.csv")) == 2000
    # by a wide margin (about 100x on 2 cores), so no timing noise can flip it
    assert sec["predict"] > 5 * sec["train"] and sec["train"] + sec["predict"] <= sec["total"], sec


def test_predict_only_does_not_score_another_split(base, run_copy):
    # Another --val-size carves another hold-out from the training set, which would include
    # images the model trained on: no accuracy is reported for it, and the run says why.
    held_out = json.loads((base["out"] / "metrics.json").read_text())["n_val"]
    res = smoke(run_copy, base["data"], base["test_npy"], "--predict-only", "--val-size", held_out // 2)
    ok(res)
    assert "no validation accuracy" in res.stdout and f"--val-size {held_out}" in res.stdout
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["val_acc"] is None and metrics["n_val"] == 0
    assert read(run_copy / "submission.csv") == read(base["out"] / "submission.csv")


def test_predict_only_does_not_score_the_hold_out_of_another_training_set(base, run_copy):
    # The same --val-size carved from a training set of another size (another data set or
    # slice) is another split, whose hold-out may hold images the model trained on.
    saved = torch.load(run_copy / "model.pt", weights_only=True)
    torch.save(dict(saved, n_train=saved["n_train"] + 88), run_copy / "model.pt")
    res = smoke(run_copy, base["data"], base["test_npy"], "--predict-only")
    ok(res)
    assert "no validation accuracy" in res.stdout
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["val_acc"] is None and metrics["n_val"] == 0


def test_model_pt_records_a_run_without_a_hold_out_as_zero(base):
    # 0 (trained on every image) is a split too; None is what a model.pt without the record has
    ok(base["res"])
    saved = torch.load(base["out"] / "model.pt", weights_only=True)
    assert saved["val_size"] == json.loads((base["out"] / "metrics.json").read_text())["n_val"] > 0
    net = hw2.Net((8, 8, 8))
    data = dict(train_x=np.zeros((40, 3, 32, 32), np.uint8), val_x=np.zeros((0, 3, 32, 32), np.uint8))
    rec = hw2.model_record(net, argparse.Namespace(preset="smoke", seed=0), dict(widths=(8, 8, 8), residual=(True,) * 3),
                           [], 32, data)
    assert (rec["n_train"], rec["val_size"]) == (40, 0)


def test_predict_only_of_a_gpu_model_on_the_cpu_names_every_flag_needed(base, run_copy):
    # On a machine without a GPU, --device auto turns an explicit `full` into `quick`, so the
    # hint must also name --device cpu, or following it would give the same error again.
    saved = torch.load(run_copy / "model.pt", weights_only=True)
    torch.save(dict(saved, preset="full"), run_copy / "model.pt")
    res = smoke(run_copy, base["data"], base["test_npy"], "--predict-only")
    failed(res, "holds a full model, not smoke", "pass --preset full --device cpu")


@pytest.mark.parametrize("trained, flags, needle", [
    ("quick", [], "holds a quick model, not smoke: pass --preset quick"),
    ("full", ["--device", "cpu"], "holds a full model, not smoke: pass --preset full --device cpu"),
], ids=["quick_model", "gpu_model_device_cpu"])
def test_predict_only_refuses_another_preset_before_problems(base, run_copy, trained, flags, needle):
    # where the flags alone settle the preset, another model's preset fails before Problems 1-3
    # spend their ~10 s, with the message the check after the hardware choice gives
    saved = torch.load(run_copy / "model.pt", weights_only=True)
    torch.save(dict(saved, preset=trained), run_copy / "model.pt")
    res = smoke(run_copy, base["data"], base["test_npy"], "--predict-only", *flags, answers=True)
    failed(res, run_copy / "model.pt", needle)
    assert "Problem 1" not in res.stdout, res.stdout[-2000:]


@pytest.mark.parametrize("given, device, trained, early", [
    ("smoke", "auto", "quick", True),    # an explicit quick or smoke is what the run trains
    ("quick", "auto", "smoke", True),
    ("full", "cuda", "fast", True),      # --device set: full and fast are kept as given
    ("fast", "cpu", "quick", True),
    ("smoke", "auto", "full", False),    # the hint depends on whether a GPU is there
    ("full", "auto", "quick", False),    # --device auto on a CPU turns full into quick: it may match
    ("full", "auto", "fast", False),
    (None, "cpu", "quick", False),       # no --preset: the hardware chooses it
    ("quick", "auto", "quick", False),   # the same preset
], ids=lambda v: str(v))
def test_predict_only_refuses_another_preset_early_only_where_the_flags_settle_it(given, device, trained, early):
    cfg = argparse.Namespace(preset=given, device=device, epochs=None, widths=None, seed=0, seed_given=False,
                             optimizer="preset")
    saved = dict(history=[{}] * 2, preset=trained, widths=[8, 16, 16], seed=0, optimizer="sgd")
    if early:
        with pytest.raises(hw2.HW2Error, match=f"holds a {trained} model, not {given}: pass --preset {trained}"):
            hw2.predict_only_conflicts(cfg, saved, "o/model.pt")
    else:
        hw2.predict_only_conflicts(cfg, saved, "o/model.pt")  # left to the check after the hardware choice


@pytest.mark.parametrize("flags, needles", [
    (["--epochs", "5"], ["--epochs 5 (it trained with 2)", "drop that flag"]),
    (["--widths", "8,8,8"], ["--widths 8,8,8 (it trained with 8,16,16)"]),
    (["--seed", "3"], ["--seed 3 (it trained with 0)"]),
    (["--optimizer", "muon"], ["--optimizer muon (it trained with sgd)"]),
    (["--epochs", "5", "--seed", "3"], ["--epochs 5 (it trained with 2); --seed 3 (it trained with 0)",
                                        "drop those flags"]),
], ids=["epochs", "widths", "seed", "optimizer", "two"])
def test_predict_only_refuses_a_training_flag_it_would_ignore(base, run_copy, flags, needles):
    # the model in model.pt is predicted as it trained: `--epochs 5` there retrains nothing, so a
    # value other than the one it trained with is refused before anything is replaced, and before
    # Problems 1-3 spend their ~10 s (answers=True: the script as a user runs it)
    saved = torch.load(run_copy / "model.pt", weights_only=True)
    assert (len(saved["history"]), tuple(saved["widths"]), saved["seed"], saved["optimizer"]) == \
        (2, (8, 16, 16), 0, "sgd")  # what the needles say it trained with
    before = read(run_copy / "submission.csv")
    res = smoke(run_copy, base["data"], base["test_npy"], "--predict-only", *flags, answers=True)
    failed(res, run_copy / "model.pt", *needles)
    assert "Problem 1" not in res.stdout, res.stdout[-2000:]
    assert read(run_copy / "submission.csv") == before and (run_copy / "metrics.json").exists()


def test_predict_only_accepts_training_flags_equal_to_the_model_s(base, run_copy):
    # a notebook's HW2_EPOCHS / HW2_SEED still set from the training run: the same values pass
    (run_copy / "submission.csv").unlink()
    res = smoke(run_copy, base["data"], base["test_npy"], "--predict-only", "--epochs", "2",
                "--widths", "8, 16, 16", "--seed", "0", "--optimizer", "sgd")
    ok(res)
    assert read(run_copy / "submission.csv") == read(base["out"] / "submission.csv")


def test_predict_only_refuses_a_seed_an_older_model_pt_does_not_record(base, run_copy):
    saved = torch.load(run_copy / "model.pt", weights_only=True)
    torch.save({k: v for k, v in saved.items() if k != "seed"}, run_copy / "model.pt")
    failed(smoke(run_copy, base["data"], base["test_npy"], "--predict-only", "--seed", "0"),
           "--seed 0 (it trained with a value it does not record)")
    ok(smoke(run_copy, base["data"], base["test_npy"], "--predict-only"))  # without the flag: fine


def test_predict_only_in_an_empty_dir_fails(base, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    res = smoke(out, base["data"], base["test_npy"], "--predict-only")
    failed(res, out / "model.pt", "does not exist")
    assert "train_loss" not in res.stdout
    assert out.is_dir() and os.listdir(out) == []  # the user's dir stays, empty


# ------------------------------------------------------------------ in-process: load_checkpoint

@pytest.mark.parametrize("change", [dict(precision="bf16"), dict(deterministic=True)],
                         ids=["precision", "deterministic"])
def test_resume_refuses_a_checkpoint_of_other_numerics(tmp_path, change):
    # fp16/bf16/fp32 and deterministic kernels change the arithmetic (and the scaler's state):
    # continuing with other settings would not reproduce the run that wrote the checkpoint
    hp = hw2.PRESETS["smoke"]
    hw2.train(train_data(), hp, CPU, train_cfg(tmp_path), 1, 32, log=quiet)
    hw_b = dict(CPU, precision=change.get("precision", "fp32"))
    cfg_b = train_cfg(tmp_path, resume=True, deterministic=change.get("deterministic", False))
    with pytest.raises(hw2.HW2Error, match="from another run"):
        hw2.train(train_data(), hp, hw_b, cfg_b, 1, 32, log=quiet)
    hw2.train(train_data(), hp, CPU, train_cfg(tmp_path, resume=True), 1, 32, log=quiet)  # control


def test_usable_cpus_follows_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert hw2.usable_cpus() == 2
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows
    assert hw2.usable_cpus() == 64

def test_load_checkpoint_garbage_raises(tmp_path):
    p = tmp_path / "checkpoint.pt"
    p.write_bytes(b"not a checkpoint at all")
    with pytest.raises(hw2.HW2Error, match=re.escape(str(p)) + ".*not a usable checkpoint"):
        hw2.load_checkpoint(str(p))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_load_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "PWNED"
    p = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "evil": _Evil(marker)}, p, pickle_protocol=2)
    with pytest.raises(hw2.HW2Error, match="not a usable checkpoint"):
        hw2.load_checkpoint(str(p))
    assert not marker.exists()
    # control: an unrestricted load does run the payload
    torch.load(p, weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------ damaged checkpoint.pt / model.pt

def _nan_weights(c):
    return dict(c, model={k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                          for k, v in c["model"].items()})


def _one_nan_weight(c):
    weights = {k: v.clone() for k, v in c["model"].items()}
    weights["head.weight"][0, 0] = float("nan")  # one entry is enough to poison every prediction
    return dict(c, model=weights)


# (file written, what it holds: a function of the base run's checkpoint.pt and model.pt, the phrase)
DAMAGED = {
    "checkpoint_tensor": ("checkpoint.pt", lambda ck, m: torch.zeros(3), "holds a Tensor, not hw2's dict"),
    "checkpoint_identity_str": ("checkpoint.pt", lambda ck, m: dict(ck, identity="x"), "malformed"),
    "checkpoint_no_history": ("checkpoint.pt", lambda ck, m: {k: v for k, v in ck.items() if k != "history"},
                              "not a usable checkpoint.pt (no history)"),
    "checkpoint_epoch_str": ("checkpoint.pt", lambda ck, m: dict(ck, epoch="1"), "malformed"),
    "checkpoint_epoch_bool": ("checkpoint.pt", lambda ck, m: dict(ck, epoch=True), "malformed"),
    "checkpoint_step_bool": ("checkpoint.pt", lambda ck, m: dict(ck, step=False), "malformed"),
    "checkpoint_is_model": ("checkpoint.pt", lambda ck, m: m, "it is a model.pt, which --predict-only reads"),
    "model_tensor": ("model.pt", lambda ck, m: [1, 2], "not a usable model.pt (holds a list"),
    "model_weights_list": ("model.pt", lambda ck, m: dict(m, model=[1, 2]), "'model' is not a set of weights"),
    "model_widths_str": ("model.pt", lambda ck, m: dict(m, widths="abc"), "malformed"),
    "model_widths_huge": ("model.pt", lambda ck, m: dict(m, widths=[8, 8, 2**70]), "malformed"),
    "model_width_0": ("model.pt", lambda ck, m: dict(m, widths=[8, 0, 8]), "malformed"),
    "model_residual_int": ("model.pt", lambda ck, m: dict(m, residual=5), "malformed"),
    "model_residual_short": ("model.pt", lambda ck, m: dict(m, residual=[True]), "malformed"),
    "model_batch_size_0": ("model.pt", lambda ck, m: dict(m, batch_size=0), "malformed"),
    "model_history_row_empty": ("model.pt", lambda ck, m: dict(m, history=[{}]), "malformed"),
    "model_history_loss_str": ("model.pt", lambda ck, m: dict(m, history=[dict(m["history"][0], train_loss="x")]),
                               "malformed"),
    "model_meta_weight": ("model.pt", lambda ck, m: dict(m, model={**m["model"], "w": torch.empty(2, device="meta")}),
                          "'model' is not a set of weights"),
    "model_complex_nan": ("model.pt", lambda ck, m: dict(m, model={**m["model"], "w": torch.full((2,), complex("nan"))}),
                          "'model' is not a set of weights"),
    "model_no_history": ("model.pt", lambda ck, m: {k: v for k, v in m.items() if k != "history"},
                         "not a usable model.pt (no history)"),
    # numbers past any run (these passed, then overflowed in torch.split, the lr schedule or a plot)
    "model_batch_size_10_30": ("model.pt", lambda ck, m: dict(m, batch_size=10**30), "malformed"),
    "checkpoint_step_10_30": ("checkpoint.pt", lambda ck, m: dict(ck, step=10**30), "malformed"),
    "model_history_acc_1e308": ("model.pt", lambda ck, m: dict(m, history=[dict(m["history"][0], train_acc=1e308)]),
                                "malformed"),
    "model_history_seconds_negative": ("model.pt", lambda ck, m: dict(m, history=[dict(m["history"][0], seconds=-1.0)]),
                                       "malformed"),
    "model_nan_weights": ("model.pt", lambda ck, m: _nan_weights(m), "weights hold NaN or inf"),
    "model_one_nan_weight": ("model.pt", lambda ck, m: _one_nan_weight(m), "weights hold NaN or inf"),
    "model_seed_negative": ("model.pt", lambda ck, m: dict(m, seed=-1), "malformed"),
    "model_seed_str": ("model.pt", lambda ck, m: dict(m, seed="0"), "malformed"),
    "model_optimizer_unknown": ("model.pt", lambda ck, m: dict(m, optimizer="adam"), "malformed"),
    "model_no_batch_size": ("model.pt", lambda ck, m: {k: v for k, v in m.items() if k != "batch_size"},
                            "not a usable model.pt (no batch_size)"),
    "model_is_checkpoint": ("model.pt", lambda ck, m: ck, "it is a checkpoint.pt, which --resume reads"),
}


def test_a_plain_pickle_model_pt_is_one_error_without_torchs_warning(tmp_path):
    # torch warns, over two lines, about a pickle protocol it did not write: the one-line error
    # (the file is not torch's) says all there is to say
    import pickle
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"model": {}}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would end the test here instead
        with pytest.raises(hw2.HW2Error, match=re.escape(f"{path}: not a usable model.pt (UnpicklingError)")):
            hw2.load_checkpoint(str(path))


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_load_checkpoint_refuses_a_damaged_file(base, tmp_path, case):
    # a file of the right kind (torch tensors and plain data) but not what hw2 wrote: one line
    # naming it, before anything indexes into it (these ended in AttributeError, KeyError or
    # TypeError tracebacks, or a NaN model predicted class 0 everywhere)
    ok(base["res"])
    name, make, phrase = DAMAGED[case]
    ck, m = (torch.load(base["out"] / f, weights_only=True) for f in ("checkpoint.pt", "model.pt"))
    for good in ("checkpoint.pt", "model.pt"):  # positive control: the files as written load
        assert "model" in hw2.load_checkpoint(str(base["out"] / good))
    path = tmp_path / name
    torch.save(make(ck, m), path)
    with pytest.raises(hw2.HW2Error, match=re.escape(str(path)) + ".*" + re.escape(phrase)):
        hw2.load_checkpoint(str(path))


def test_a_checkpoint_may_hold_inf_batchnorm_statistics(base, tmp_path):
    # mid-run, an fp16 step whose forward overflowed is skipped, but BatchNorm's running
    # statistics took the inf; the recount at the end replaces them, so --resume must accept it
    ok(base["res"])
    ck = torch.load(base["out"] / "checkpoint.pt", weights_only=True)
    stats = [k for k in ck["model"] if k.endswith("running_var")]
    assert stats
    ck["model"][stats[0]] = torch.full_like(ck["model"][stats[0]], float("inf"))
    torch.save(ck, tmp_path / "checkpoint.pt")
    assert torch.isinf(hw2.load_checkpoint(str(tmp_path / "checkpoint.pt"))["model"][stats[0]]).all()


def test_weights_that_do_not_fit_name_the_file(base, tmp_path):
    ok(base["res"])
    saved = torch.load(base["out"] / "model.pt", weights_only=True)
    net = hw2.Net(tuple(saved["widths"]), tuple(saved["residual"]))
    hw2.load_weights(net, saved["model"], "model.pt")  # control: the run's own weights fit
    first = next(iter(saved["model"]))
    for weights, phrase in [({**saved["model"], first: torch.zeros(2, 2)}, f"size mismatch for {first}"),
                            ({}, "Missing key(s)")]:
        with pytest.raises(hw2.HW2Error, match=r"^x/model\.pt: its weights do not fit this net \(.*"
                                               + re.escape(phrase)):
            hw2.load_weights(net, weights, "x/model.pt")


def _first_momentum(ck):
    return next(iter(ck["opt"]["state"].values()))


@pytest.mark.parametrize("damage", [
    lambda ck: dict(ck, opt={"x": 1}),
    lambda ck: dict(ck, slow={**ck["slow"], next(iter(ck["slow"])): torch.zeros(2)}),
    lambda ck: dict(ck, base_flip=ck["base_flip"][:-1]),
    lambda ck: (_first_momentum(ck).update(momentum_buffer=torch.zeros(3)), ck)[1],
], ids=["opt_garbage", "slow_shape", "base_flip_short", "momentum_shape"])
def test_resume_with_damaged_optimizer_state_is_one_line(tmp_path, monkeypatch, damage):
    # a mid-run checkpoint (killed after epoch 1 of 2) whose run identity matches, so only the
    # state past it is wrong: an HW2Error, not a KeyError now or a shape error at the first step
    hp = hw2.PRESETS["smoke"]
    killed_after_first_save(monkeypatch, lambda: hw2.train(train_data(), hp, CPU, train_cfg(tmp_path), 2, 32, log=quiet))
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()
    ck = torch.load(path, weights_only=True)
    assert ck["epoch"] == 0 and "opt" in ck and "momentum_buffer" in _first_momentum(ck)  # mid-run
    torch.save(damage(ck), path)
    with pytest.raises(hw2.HW2Error, match=r"--resume: .*checkpoint\.pt: damaged optimizer or generator state"):
        hw2.train(train_data(), hp, CPU, train_cfg(tmp_path, resume=True), 2, 32, log=quiet)
    path.write_bytes(good)  # control: the undamaged checkpoint resumes to the end
    _, history = hw2.train(train_data(), hp, CPU, train_cfg(tmp_path, resume=True), 2, 32, log=quiet)
    assert len(history) == 2


@pytest.mark.parametrize("case", ["model_nan_weights", "model_is_checkpoint"])
def test_predict_only_refuses_a_damaged_model_pt(base, run_copy, case):
    name, make, phrase = DAMAGED[case]
    ck, m = (torch.load(run_copy / f, weights_only=True) for f in ("checkpoint.pt", "model.pt"))
    torch.save(make(ck, m), run_copy / name)
    (run_copy / "submission.csv").unlink()
    res = smoke(run_copy, base["data"], base["test_npy"], "--predict-only", answers=True)
    failed(res, run_copy / name, phrase)
    assert "Problem 1" not in res.stdout, res.stdout[-2000:]  # refused before Problems 1-3
    assert not (run_copy / "submission.csv").exists()

"""The CPU's precision (issue #10): bf16 autocast where the CPU computes bf16 natively (AVX512-BF16
or AMX) and a measured step shows it faster than fp32, fp32 elsewhere with the `quick` preset's
cheaper fp32 recipe, and byte-identical reruns either way."""
import argparse
import os
import platform

import pytest
import torch

import hw2
from conftest import quiet as _quiet, state_equal as _state_equal, train_cfg as _cfg, train_data as _data

sel = hw2.select_hardware


# ------------------------------------------------------------------ the choice (pure)

@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_cpu_auto_precision_follows_native_bf16(native, expected):
    for device in ("auto", "cpu"):
        plan = sel(device, None, [], cpu_bf16=native)
        assert plan["device"] == "cpu" and plan["precision"] == expected and plan["preset"] == "quick"


def test_unusable_gpu_falls_back_to_cpu_bf16_where_native():
    plan = sel("auto", (6, 0), ["sm_75"], cpu_bf16=True)
    assert (plan["device"], plan["precision"], plan["preset"]) == ("cpu", "bf16", "quick")


def test_cpu_explicit_bf16_needs_native_support():
    assert sel("cpu", None, [], precision="bf16", cpu_bf16=True)["precision"] == "bf16"
    with pytest.raises(hw2.HW2Error) as err:
        sel("cpu", None, [], precision="bf16", cpu_bf16=False)
    msg = str(err.value)
    assert msg.startswith("--precision bf16: ") and "no native bf16" in msg and "--precision fp32" in msg
    assert "\n" not in msg


def test_a_torch_that_cannot_tell_native_bf16_says_so_and_leaves_bf16_to_the_user(monkeypatch):
    """torch 2.3 has neither probe: cpu_native_bf16 is None (unknown), not False. `auto` then takes
    fp32 (the recipe that fits anywhere); an explicit bf16 runs, with a note, where it used to be
    refused with "this CPU has no native bf16", wrong on a CPU that has it."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert hw2.cpu_native_bf16() is None
    assert sel("cpu", None, [], cpu_bf16=None)["precision"] == "fp32"
    plan = sel("auto", None, [], precision="bf16", cpu_bf16=None)
    assert plan["precision"] == "bf16" and plan["device"] == "cpu"
    assert plan["note"].startswith("no GPU found: running on the CPU; --precision bf16: torch ")
    assert "cannot tell whether this CPU computes bf16 natively" in plan["note"]
    assert "cannot tell" not in sel("cpu", None, [], precision="bf16", cpu_bf16=True)["note"]
    # the note is no GPU fallback: an explicit preset stays (only a fallback makes full/fast quick)
    assert sel("cpu", None, [], precision="bf16", preset="fast", cpu_bf16=None)["preset"] == "fast"


def test_cpu_fp16_is_refused_even_with_native_bf16():
    with pytest.raises(hw2.HW2Error, match="--precision fp16: needs a CUDA GPU"):
        sel("cpu", None, [], precision="fp16", cpu_bf16=True)


def test_cpu_explicit_fp32_is_kept_on_a_bf16_cpu():
    assert sel("cpu", None, [], precision="fp32", cpu_bf16=True)["precision"] == "fp32"


def test_gpu_choice_ignores_the_cpu():
    for native in (True, False):
        assert sel("auto", (7, 5), ["sm_75"], cpu_bf16=native)["precision"] == "fp16"
        with pytest.raises(hw2.HW2Error, match="sm_80"):
            sel("auto", (7, 5), ["sm_75"], precision="bf16", cpu_bf16=native)


def test_choose_hardware_uses_the_detected_cpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    cfg = argparse.Namespace(device="auto", precision="auto", compile=False, preset=None, gpus="auto")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(hw2, "cpu_native_bf16", lambda: native)
        assert hw2.choose_hardware(cfg)["precision"] == expected
    cfg.precision = "bf16"
    with pytest.raises(hw2.HW2Error, match="no native bf16"):
        hw2.choose_hardware(cfg)


# ------------------------------------------------------------------ native is not enough: measured

# One training step of quick's bf16 net, batch 256, 2 cores, seconds (fp32, bf16), BENCHMARKS.md
ZEN5_STEP = (0.18, 0.11)       # AMD Zen 5 (AVX512-BF16): the bf16 recipe's command (12 epochs then) took 308 s
XEON_NO_AMX_STEP = (0.31, 0.49)  # Intel Xeon family 6 model 207, AMX hidden by its VM: 1018 s


def _bf16_plan(**kw):
    plan = dict(device="cpu", precision="bf16", auto_precision=True)
    plan.update(kw)
    return plan


def _never():
    raise AssertionError("measured or read where nothing should be")


def test_auto_keeps_bf16_only_where_it_measures_faster():
    quick = hw2.PRESETS["quick"]
    for (fp32_s, bf16_s), kept, epochs in ((ZEN5_STEP, "bf16", quick["epochs"]),
                                           (XEON_NO_AMX_STEP, "fp32", quick["cpu_fp32"]["epochs"])):
        plan = _bf16_plan()
        line = hw2.settle_cpu_precision(plan, measure=lambda: fp32_s / bf16_s)
        assert plan["precision"] == kept and plan["bf16_speedup"] == round(fp32_s / bf16_s, 2)
        assert line.startswith("precision: ") and line.endswith(f"-> {kept}; --precision pins it")
        # ... and quick trains the recipe sized for that precision (the Xeon: 6 minutes in fp32)
        assert hw2.preset_hparams("quick", plan)["epochs"] == epochs
    # the threshold sits well between the two CPUs measured, so noise can't flip either
    assert 1.25 * hw2.BF16_MIN_SPEEDUP <= ZEN5_STEP[0] / ZEN5_STEP[1]
    assert XEON_NO_AMX_STEP[0] / XEON_NO_AMX_STEP[1] <= hw2.BF16_MIN_SPEEDUP / 1.25
    plan = _bf16_plan()
    hw2.settle_cpu_precision(plan, measure=lambda: hw2.BF16_MIN_SPEEDUP)
    assert plan["precision"] == "bf16"  # at the threshold: bf16


def test_nothing_is_measured_unless_auto_chose_bf16_on_the_cpu():
    for plan in (_bf16_plan(auto_precision=False),            # --precision bf16: honoured as asked
                 _bf16_plan(precision="fp32"),                 # no native bf16, or --precision fp32
                 _bf16_plan(device="cuda", precision="fp16"),  # a GPU
                 _bf16_plan(device="cuda"),                    # --precision bf16 on an sm_80+ GPU
                 _bf16_plan(world_size=2)):  # several CPU processes: each must choose alike
        before = dict(plan)
        assert hw2.settle_cpu_precision(plan, measure=_never, saved=_never) == ""
        assert plan == dict(before, bf16_speedup=None)


def test_a_resumed_or_reloaded_run_keeps_its_saved_precision():
    for saved in ("bf16", "fp32"):
        plan = _bf16_plan()
        line = hw2.settle_cpu_precision(plan, measure=_never, saved=lambda: saved)
        assert plan["precision"] == saved and plan["bf16_speedup"] is None
        assert line == f"precision: {saved}, as the saved run was trained (nothing measured)"
    plan = _bf16_plan()  # a file from before the record: measured like a new run
    hw2.settle_cpu_precision(plan, measure=lambda: 0.5, saved=lambda: None)
    assert plan["precision"] == "fp32" and plan["bf16_speedup"] == 0.5


def test_choose_hardware_marks_an_automatic_precision(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    monkeypatch.setattr(hw2, "cpu_native_bf16", lambda: True)
    cfg = argparse.Namespace(device="auto", precision="auto", compile=False, preset=None, gpus="auto")
    assert hw2.choose_hardware(cfg)["auto_precision"] is True
    cfg.precision = "bf16"
    assert hw2.choose_hardware(cfg)["auto_precision"] is False
    # a GPU that fails its test op: every precision request lapses to the CPU's automatic choice
    facts = dict(capability=(8, 0), arch=["sm_80"], count=1, name="A100", error="RuntimeError: boom")
    monkeypatch.setattr(hw2, "probe_cuda_facts", lambda: facts)
    plan = hw2.choose_hardware(cfg)
    assert (plan["device"], plan["precision"], plan["auto_precision"]) == ("cpu", "bf16", True)


def test_bf16_speedup_is_measured_on_real_steps_and_leaves_no_trace():
    """The measurement runs the real net's training step in both precisions, and leaves the global
    RNG (every seeded run's start) and the thread count as it found them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = torch.get_rng_state()
        seen = []
        real_autocast = torch.autocast

        def spy(device, dtype=None, enabled=True):
            seen.append((device, dtype if enabled else None))
            return real_autocast(device, dtype=dtype, enabled=enabled)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "autocast", spy)
            speedup = hw2.cpu_bf16_speedup(batch=8, pairs=1)
        assert 0 < speedup < float("inf")
        assert seen == [("cpu", None), ("cpu", torch.bfloat16)] * 2  # warm-up pair + one timed pair
        assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_bf16_speedup_is_fp32_time_over_bf16_time(monkeypatch):
    """A stand-in net whose bf16 step takes 200 ms longer: the speed-up reads well below 1 (bf16 is
    slower, so fp32 is kept); with the ratio turned over it would read well above. (The best of 3
    pairs, and fp32's millisecond step would have to take 100 ms to flip it on a loaded machine.)"""
    import time

    class SlowInBf16(torch.nn.Module):
        def __init__(self, *args):
            super().__init__()
            self.lin = torch.nn.Linear(3 * 32 * 32, 10)

        def forward(self, x):
            try:
                bf16 = torch.is_autocast_enabled("cpu")
            except TypeError:  # torch < 2.4: no device argument
                bf16 = torch.is_autocast_cpu_enabled()
            if bf16:
                time.sleep(0.2)
            return self.lin(x.flatten(1))

    monkeypatch.setattr(hw2, "Net", SlowInBf16)
    assert hw2.cpu_bf16_speedup(batch=4, pairs=3) < 0.5


# ------------------------------------------------------------------ detection

def _cpuinfo_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_native_bf16_detection_agrees_with_the_kernel():
    """torch's CPU probe against the kernel's own flag list: an independent route to the same fact."""
    flags = _cpuinfo_flags()
    if flags is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs /proc/cpuinfo on an x86-64 CPU")
    if not any(hasattr(torch.cpu, n) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")):
        assert hw2.cpu_native_bf16() is None  # a torch without the probes (2.3) cannot tell
        return
    assert hw2.cpu_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


# ------------------------------------------------------------------ the epochs

def test_quick_takes_its_fp32_recipe_on_a_cpu_in_fp32_only():
    quick = hw2.PRESETS["quick"]
    fp32 = quick["cpu_fp32"]
    cpu = lambda p: dict(device="cpu", precision=p)
    # fp32 steps cost more: a cheaper run (fewer image-FLOPs) than the bf16 recipe
    cost = lambda hp: hw2.count_flops(hp)["train_per_image"] * hp["epochs"]
    bf16_hp, fp32_hp = hw2.preset_hparams("quick", cpu("bf16")), hw2.preset_hparams("quick", cpu("fp32"))
    assert cost(fp32_hp) < 0.5 * cost(bf16_hp)
    assert {k: bf16_hp[k] for k in fp32} == {k: quick[k] for k in fp32}
    assert {k: fp32_hp[k] for k in fp32} == fp32
    assert {k: v for k, v in fp32_hp.items() if k not in fp32} == \
        {k: v for k, v in bf16_hp.items() if k not in fp32}  # only the net and its length change
    # a GPU in fp32 is fast enough for the main recipe
    assert hw2.preset_hparams("quick", dict(device="cuda", precision="fp32")) == bf16_hp
    for name in hw2.PRESETS:  # the key is consumed, never passed on as a hyperparameter
        assert "cpu_fp32" not in hw2.preset_hparams(name, cpu("fp32"))
    assert hw2.preset_hparams("smoke", cpu("fp32")) == hw2.PRESETS["smoke"]


# Measured on 2026-11-28 (BENCHMARKS.md, issue #10's budget on a CPU without native bf16): the
# hidden-check command with the 8-epoch fp32 recipe on a 2-core Zen 3 (AVX2, no AVX-512) took
# 380.4 s wall, of which training 343.2 s; its slowest epoch (50,000 images, stem frozen) took
# 50.9 s. Not a timed test: the recipe's counted FLOPs against that machine's slowest rate.
ZEN3_NET_FLOP_PER_IMAGE = 85_564_992  # the fp32 recipe's net, whose rate was measured
ZEN3_SLOWEST_FP32_FLOP_PER_S = 50_000 * ZEN3_NET_FLOP_PER_IMAGE / 50.9
ZEN3_FIXED_S = 380.4 - 343.2  # start-up, Problems 1-3, data, 6-view TTA of 10,000 test images
CPU_BUDGET_S = 360  # issue #10: the whole command within 6 minutes on 2 cores


def check_fits_the_budget(precision, flop_per_image, flop_per_s, fixed_s):
    """`quick`'s recipe in `precision`, on the net whose rate was measured: its epochs at that
    machine's slowest rate, plus the run's fixed seconds, fit CPU_BUDGET_S, and one more would not."""
    hp = hw2.preset_hparams("quick", dict(device="cpu", precision=precision))
    assert hw2.count_flops(hp)["train_per_image"] == flop_per_image  # else: re-measure the rate
    seconds = lambda epochs: hw2.count_run_flops(hp, epochs, 50_000)["train_run"] / flop_per_s + fixed_s
    assert seconds(hp["epochs"]) <= CPU_BUDGET_S, \
        f"{hp['epochs']} epochs: ~{seconds(hp['epochs']):.0f} s if every epoch is the slowest seen"
    assert seconds(hp["epochs"] + 1) > CPU_BUDGET_S  # and it trains as long as that allows


def test_quick_fp32_recipe_fits_six_minutes_at_the_slowest_rate_measured():
    check_fits_the_budget("fp32", ZEN3_NET_FLOP_PER_IMAGE, ZEN3_SLOWEST_FP32_FLOP_PER_S, ZEN3_FIXED_S)


# Measured on 2026-12-01 (BENCHMARKS.md): the hidden-check command with the then 12-epoch bf16
# recipe on a 2-core Xeon (family 6 model 207) whose AMX torch uses took 431.0 s wall, of which
# training 402.6 s; its slowest epoch (50,000 images, stem frozen) took 39.46 s.
XEON_AMX_NET_FLOP_PER_IMAGE = 222_716_736  # the bf16 recipe's net, whose rate was measured
XEON_AMX_SLOWEST_BF16_FLOP_PER_S = 50_000 * XEON_AMX_NET_FLOP_PER_IMAGE / 39.46
XEON_AMX_FIXED_S = 431.0 - 402.6  # start-up, Problems 1-3, data, the bf16 measurement, TTA


def test_quick_bf16_recipe_fits_six_minutes_at_the_slowest_rate_measured():
    check_fits_the_budget("bf16", XEON_AMX_NET_FLOP_PER_IMAGE, XEON_AMX_SLOWEST_BF16_FLOP_PER_S,
                          XEON_AMX_FIXED_S)


# ------------------------------------------------------------------ bf16 is really used

def test_cpu_bf16_autocast_runs_the_convolutions_in_bf16():
    model = hw2.Net(**{k: hw2.PRESETS["smoke"][k] for k in ("widths", "residual")}).eval()
    seen = []
    model.groups[0].conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(4, 3, 32, 32)
    for precision in ("bf16", "fp32"):
        with torch.no_grad(), hw2.autocast_ctx("cpu", precision):
            model(x)
    assert seen == [torch.bfloat16, torch.float32]


# ------------------------------------------------------------------ reproducible in both precisions


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_same_seed_twice_is_bitwise_identical(tmp_path, precision):
    # killed-and-resumed in both precisions: tests/test_recipe.py
    hw = dict(device="cpu", precision=precision, compile=False)
    data, hp = _data(), dict(hw2.PRESETS["smoke"])
    runs = []
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        runs.append(hw2.train(data, hp, hw, _cfg(tmp_path / name), 3, 32, log=_quiet)[0])
    assert _state_equal(runs[0].state_dict(), runs[1].state_dict())
    logits = [hw2.predict_logits(m, data["val_x"], "cpu", precision, tta=2) for m in runs]
    assert torch.equal(logits[0], logits[1])


def test_bf16_and_fp32_training_really_differ(tmp_path):
    """Positive control for the test above: the precision reaches the training step."""
    data, hp = _data(), dict(hw2.PRESETS["smoke"])
    states = []
    for precision in ("bf16", "fp32"):
        os.makedirs(tmp_path / precision)
        hw = dict(device="cpu", precision=precision, compile=False)
        states.append(hw2.train(data, hp, hw, _cfg(tmp_path / precision), 1, 32, log=_quiet)[0].state_dict())
    assert not _state_equal(*states)

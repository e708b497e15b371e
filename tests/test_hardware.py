"""Hardware choice: `select_hardware` is pure, so every card is tested here without owning it."""
import argparse
import threading
import time

import pytest
import torch

import hw2
from conftest import CPU, quiet, train_cfg, train_data

CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # no sm_60: Kaggle's P100 is out
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
P100, T4, A100, H100 = (6, 0), (7, 5), (8, 0), (9, 0)
sel = hw2.select_hardware


# ------------------------------------------------------------------ cuda_arch_supported

@pytest.mark.parametrize("cap,archs,ok", [
    ((8, 9), ["sm_86"], True),            # same major, lower minor SASS runs
    ((8, 6), ["sm_80"], True),
    ((8, 0), ["sm_90"], False),           # newer SASS never runs on an older card
    ((8, 0), ["sm_86"], False),           # same major, but the build's minor is higher
    ((7, 5), ["sm_80", "sm_86"], False),
    ((6, 0), CU128, False),               # the P100 + cu128 wheel case
    ((6, 0), CU126, True),
    ((9, 0), ["compute_80"], True),       # PTX is JIT-compiled for newer cards
    ((7, 5), ["compute_80"], False),      # ... but not for older ones
    ((8, 0), ["compute_86"], False),      # ... nor for an older minor of the same major
    ((12, 0), CU128, True),
    ((10, 3), ["sm_100"], True),          # two-digit major
    ((9, 0), [], False),
])
def test_cuda_arch_supported(cap, archs, ok):
    assert hw2.cuda_arch_supported(cap, archs) is ok


# ------------------------------------------------------------------ P100 (sm_60)

def test_p100_cu128_device_cuda_raises_naming_t4_and_arch():
    with pytest.raises(hw2.HW2Error) as err:
        sel("cuda", P100, CU128)
    msg = str(err.value)
    assert "T4" in msg and "sm_60" in msg and "--device cuda" in msg


@pytest.mark.parametrize("asked", [None, "full"])
def test_p100_cu128_auto_falls_back_to_cpu_quick(asked):
    plan = sel("auto", P100, CU128, preset=asked)
    assert plan["device"] == "cpu" and plan["precision"] == "fp32" and plan["preset"] == "quick"
    assert plan["compile"] is False
    assert "sm_60" in plan["note"] and "CPU" in plan["note"] and "T4" in plan["note"]


def test_p100_cu128_auto_keeps_a_small_preset():
    assert sel("auto", P100, CU128, preset="smoke")["preset"] == "smoke"
    assert sel("auto", P100, CU128, preset="quick")["preset"] == "quick"


def test_p100_cu128_auto_fp16_raises():
    # the GPU is unusable, so an explicit fp16 cannot be honoured on the CPU fallback
    with pytest.raises(hw2.HW2Error, match="fp16"):
        sel("auto", P100, CU128, precision="fp16")


def test_p100_with_sm60_build_uses_cuda_fp16():
    plan = sel("auto", P100, CU126)
    assert plan == dict(device="cuda", precision="fp16", compile=False, preset="full", note="")
    assert sel("cuda", P100, ["sm_60"])["device"] == "cuda"


def test_p100_compile_raises():
    with pytest.raises(hw2.HW2Error, match="--compile"):
        sel("auto", P100, CU126, compile_model=True)


def test_p100_bf16_raises():
    with pytest.raises(hw2.HW2Error, match="bf16"):
        sel("cuda", P100, CU126, precision="bf16")


# ------------------------------------------------------------------ T4 (sm_75)

def test_t4_defaults():
    plan = sel("auto", T4, CU128)
    assert plan == dict(device="cuda", precision="fp16", compile=False, preset="full", note="")
    assert sel("cuda", T4, CU128) == plan


def test_t4_bf16_raises():
    with pytest.raises(hw2.HW2Error) as err:
        sel("auto", T4, CU128, precision="bf16")
    assert "sm_75" in str(err.value) and "fp16" in str(err.value)


def test_t4_compile_allowed():
    plan = sel("auto", T4, CU128, compile_model=True)
    assert plan["device"] == "cuda" and plan["compile"] is True
    assert sel("auto", (7, 0), CU126, compile_model=True)["compile"] is True  # a V100: Triton's oldest


def test_t4_fp32_and_explicit_preset():
    plan = sel("auto", T4, CU128, precision="fp32", preset="smoke")
    assert plan["precision"] == "fp32" and plan["preset"] == "smoke" and plan["device"] == "cuda"


def test_t4_device_cpu_is_honoured():
    plan = sel("cpu", T4, CU128)
    assert plan["device"] == "cpu" and plan["precision"] == "fp32" and plan["preset"] == "quick"


# ------------------------------------------------------------------ A100 / H100

@pytest.mark.parametrize("cap", [A100, H100], ids=["A100", "H100"])
def test_ampere_hopper_fp16_default_bf16_allowed(cap):
    assert sel("auto", cap, CU128)["precision"] == "fp16"
    plan = sel("auto", cap, CU128, precision="bf16", compile_model=True)
    assert plan["device"] == "cuda" and plan["precision"] == "bf16" and plan["compile"] is True
    assert plan["preset"] == "full"


def test_h100_with_only_compute_80_ptx_is_supported():
    plan = sel("cuda", H100, ["compute_80"])
    assert plan["device"] == "cuda" and plan["precision"] == "fp16"


def test_h100_with_only_older_sass_falls_back():
    plan = sel("auto", H100, ["sm_75", "sm_80", "sm_86"])
    assert plan["device"] == "cpu" and "sm_90" in plan["note"]


# ------------------------------------------------------------------ no GPU

def test_cpu_auto():
    plan = sel("auto", None, [])
    assert plan["device"] == "cpu" and plan["precision"] == "fp32" and plan["preset"] == "quick"
    assert plan["compile"] is False and plan["note"]


def test_cpu_explicit_preset_kept():
    assert sel("auto", None, [], preset="smoke")["preset"] == "smoke"
    assert sel("cpu", None, [], preset="quick")["preset"] == "quick"


def test_cpu_device_cuda_raises():
    with pytest.raises(hw2.HW2Error, match="--device cuda"):
        sel("cuda", None, [])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cpu_half_precision_raises(precision):
    with pytest.raises(hw2.HW2Error, match=f"--precision {precision}"):
        sel("auto", None, [], precision=precision)


def test_cpu_compile_raises():
    with pytest.raises(hw2.HW2Error, match="--compile"):
        sel("auto", None, [], compile_model=True)


# ------------------------------------------------------------------ this machine

def _cfg(**kw):
    base = dict(device="auto", precision="auto", compile=False, preset=None)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture
def no_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")


def test_choose_hardware_on_this_machine_is_cpu(no_gpu):
    plan = hw2.choose_hardware(_cfg())
    expected = "bf16" if hw2.cpu_native_bf16() else "fp32"  # tests/test_cpu_precision.py pins both
    assert plan["device"] == "cpu" and plan["precision"] == expected and plan["preset"] == "quick"
    assert isinstance(plan["name"], str) and plan["name"]
    assert hw2.choose_hardware(_cfg(preset="smoke"))["preset"] == "smoke"


def test_gpu_failing_its_test_op_falls_back_like_no_gpu(monkeypatch):
    # A visible GPU whose probe op fails: the CPU, and the GPU presets give way to `quick` as
    # when no GPU is found (`full` on a CPU would take hours); --device cuda stops.
    facts = dict(capability=(7, 5), arch=["sm_75"], count=1, name="Tesla T4",
                 error="RuntimeError: CUDA error: no kernel image is available")
    monkeypatch.setattr(hw2, "probe_cuda_facts", lambda: facts)
    for preset, expected in (("full", "quick"), ("fast", "quick"), (None, "quick"), ("smoke", "smoke")):
        plan = hw2.choose_hardware(_cfg(preset=preset, precision="fp16"))
        assert (plan["device"], plan["preset"]) == ("cpu", expected), preset
        assert plan["precision"] in ("bf16", "fp32") and "fails a test op" in plan["note"]
    with pytest.raises(hw2.HW2Error, match="--device cuda: the GPU fails a test op"):
        hw2.choose_hardware(_cfg(device="cuda", preset="full"))
    # control: the same card passing its test op trains `full` on the GPU
    monkeypatch.setattr(hw2, "probe_cuda_facts", lambda: dict(facts, error=None))
    plan = hw2.choose_hardware(_cfg(preset="full"))
    assert (plan["device"], plan["preset"], plan["precision"]) == ("cuda", "full", "fp16")


def test_compile_needs_inductors_cast_rounding(monkeypatch):
    # torch 2.3.1 (the oldest requirements.txt admits) has no emulate_precision_casts: its compiled
    # fp16 step gives NaN gradients and its Inductor fails on the fp32 backward (BENCHMARKS.md).
    # --compile is refused there in one line, before anything runs
    import torch._inductor.config as inductor_config
    assert hw2.inductor_rounds_half_casts() == hasattr(inductor_config, "emulate_precision_casts")
    t4 = dict(capability=(7, 5), arch=["sm_75"], count=1, name="Tesla T4", error=None)
    monkeypatch.setattr(hw2, "probe_cuda_facts", lambda: t4)
    monkeypatch.setattr(hw2, "inductor_rounds_half_casts", lambda: True)
    plan = hw2.choose_hardware(_cfg(preset="full", compile=True))
    assert (plan["device"], plan["precision"], plan["compile"]) == ("cuda", "fp16", True)
    monkeypatch.setattr(hw2, "inductor_rounds_half_casts", lambda: False)
    for precision in ("auto", "fp32"):
        with pytest.raises(hw2.HW2Error, match=r"^--compile: needs torch 2\.5\+, this is .*NaN gradients"):
            hw2.choose_hardware(_cfg(preset="full", compile=True, precision=precision))
    assert hw2.choose_hardware(_cfg(preset="full"))["compile"] is False  # no flag, no question


def test_a_failed_probe_is_not_reported_as_no_gpu(monkeypatch):
    # the probe's child hung or crashed (a broken driver): the note says so, not "no GPU found"
    failed = "the CUDA probe process failed: running on the CPU"
    monkeypatch.setattr(hw2, "probe_cuda_facts", lambda: dict(capability=None, arch=[], count=0, name=None,
                                                               error=None, note=failed))
    assert hw2.choose_hardware(_cfg(preset="full"))["note"] == failed
    # ... and a precision note beside it is kept (a torch that cannot tell native bf16)
    with monkeypatch.context() as m:
        m.setattr(hw2, "cpu_native_bf16", lambda: None)
        note = hw2.choose_hardware(_cfg(precision="bf16"))["note"]
    assert note.startswith(f"{failed}; --precision bf16: torch ") and "cannot tell" in note
    with pytest.raises(hw2.HW2Error, match=r"^--device cuda: the CUDA probe process failed \(it hung or crashed"):
        hw2.choose_hardware(_cfg(device="cuda"))
    # probed in this process, and the card unusable for this build: both are said
    moved = "a forked process can't start CUDA here (boom): probed in this process"
    monkeypatch.setattr(hw2, "probe_cuda_facts", lambda: dict(capability=(7, 5), arch=["sm_80"], count=1,
                                                               name="Tesla T4", error=None, note=moved))
    note = hw2.choose_hardware(_cfg(preset="full"))["note"]
    assert note.startswith("GPU unusable (") and note.endswith(f"; {moved}")


def test_choose_hardware_device_cuda_without_gpu_raises(no_gpu):
    with pytest.raises(hw2.HW2Error, match="no CUDA GPU"):
        hw2.choose_hardware(_cfg(device="cuda"))


# ------------------------------------------------------------------ --prewarm

ON = argparse.Namespace(prewarm="on")
ONE_GPU = dict(device="cuda", world_size=1)


def test_prewarm_flag_and_variable(monkeypatch):
    assert hw2.parse_config([]).prewarm == "off"  # until a card measures it (tools/device_summary.py's rule)
    assert hw2.parse_config(["--prewarm", "on"]).prewarm == "on"
    monkeypatch.setenv("HW2_PREWARM", "on")
    assert hw2.parse_config([]).prewarm == "on"


def test_prewarm_plan_only_for_one_process_on_a_gpu():
    assert hw2.prewarm_plan(ON, ONE_GPU) == (True, "")
    assert hw2.prewarm_plan(argparse.Namespace(prewarm="off"), ONE_GPU) == (False, "")
    assert hw2.prewarm_plan(argparse.Namespace(), ONE_GPU) == (False, "")  # a config from before the flag
    ok, note = hw2.prewarm_plan(ON, dict(ONE_GPU, device="cpu"))
    assert not ok and note == "--prewarm on: the run is on the CPU, which has no CUDA to start; not used"
    # forked ranks need a parent that has not started CUDA (test_distributed.py)
    ok, note = hw2.prewarm_plan(ON, dict(ONE_GPU, world_size=2))
    assert not ok and note.startswith("--prewarm on: 2 processes train, and their parent must not start CUDA")


def test_prewarm_runs_in_a_thread_joined_inside_the_training_time(monkeypatch, tmp_path):
    ran = []

    def slow():
        ran.append(threading.current_thread().name)
        time.sleep(1.0)

    monkeypatch.setattr(hw2, "prewarm_cuda", slow)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    cfg = train_cfg(tmp_path, prewarm="on")
    thread = hw2.start_prewarm(cfg, ONE_GPU)
    assert thread.is_alive() and not thread.daemon  # an early exit waits for it (no CUDA teardown under it)
    stats = {}
    hw2.join_prewarm(thread, stats)
    assert ran == ["hw2-prewarm"] and not thread.is_alive()
    # the caller waited for what was left (nearly all of it here), which the thread's own time
    # bounds (margins for a loaded machine's scheduling)
    assert 0 < stats["seconds"]["prewarm_wait"] <= stats["prewarm"]["seconds"] + 0.5
    assert stats["prewarm"] == dict(seconds=stats["prewarm"]["seconds"], waited=stats["seconds"]["prewarm_wait"],
                                    error=None)
    # train() keeps the wait beside its own parts: metrics.json's seconds.train_prewarm_wait
    hw2.train(train_data(), hw2.PRESETS["smoke"], CPU, cfg, 1, 32, log=quiet, stats=stats)
    assert set(stats["seconds"]) == {"prewarm_wait", "cuda_init", "setup"}
    # nothing started: CUDA already up in this kernel, or a run the plan excludes; no thread, no record
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert hw2.start_prewarm(cfg, ONE_GPU) is None
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert hw2.start_prewarm(cfg, dict(ONE_GPU, world_size=2)) is None
    stats = {}
    hw2.join_prewarm(None, stats)
    assert stats == {} and len(ran) == 1


def test_a_failed_prewarm_is_a_note_and_training_goes_on(monkeypatch, capsys):
    def broken():
        raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")

    monkeypatch.setattr(hw2, "prewarm_cuda", broken)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    stats = {}
    hw2.join_prewarm(hw2.start_prewarm(ON, ONE_GPU), stats)
    assert stats["prewarm"]["error"] == "RuntimeError: CUDA error: out of memory"
    assert capsys.readouterr().out == ("note: --prewarm: CUDA's start in the background failed (RuntimeError: "
                                       "CUDA error: out of memory); training starts it itself\n")


def test_prewarm_ops_draw_no_random_numbers():
    # what the thread runs, on the CPU: a conv forward and backward and a matmul, and the global
    # generator (the run's seed) untouched, so a run is the same with the thread or without
    before = torch.get_rng_state()
    hw2.prewarm_cuda("cpu", torch.float32)
    assert torch.equal(torch.get_rng_state(), before)

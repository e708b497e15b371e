"""Muon for the conv filters (the `fast` preset): the Newton-Schulz orthogonalisation against an
SVD, the optimizer's step against a hand computation, and the scale invariance it relies on."""
import copy

import pytest
import torch

import hw2
from conftest import CPU, needs_cpu_fp16, needs_cpu_fused_sgd, quiet, sgd_kilo, train_cfg, train_data

MUON = {k: hw2.PRESETS["fast"][k] for k in ("muon_lr", "muon_momentum")}  # what --optimizer muon adds


@pytest.mark.parametrize("shape", [(64, 24 * 9), (256, 256 * 9), (300, 40)])  # wide, conv-sized, tall
def test_orthogonalize_keeps_the_directions_and_equalises_the_singular_values(shape):
    """Against the exact answer from an SVD: g = U S Vᵀ with singular values over two decades;
    orthogonalising should give ≈ U Vᵀ (all singular values 1)."""
    gen = torch.Generator().manual_seed(0)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=gen))
    g = u @ torch.diag(torch.logspace(0, -2, k)) @ v.T
    polar = u @ v.T

    def cos(a, b):
        return float((a * b).sum() / (a.norm() * b.norm()))

    for steps, min_cos, min_sv in ((3, 0.85, 0.07), (5, 0.98, 0.6)):
        o = hw2.orthogonalize(g, steps)
        sv = torch.linalg.svdvals(o)
        print(f"{shape} {steps} steps: cos {cos(o, polar):.4f}, singular values {sv.min():.3f}..{sv.max():.3f}")
        assert cos(o, polar) > min_cos
        assert sv.max() < 1.25 and sv.min() > min_sv  # from 0.01..1: the spread shrinks 100x -> <17x


def test_one_newton_schulz_step_is_muons_quintic_on_the_singular_values():
    """By SVD in float64: one iteration keeps U and V and maps each singular value s of g/|g|_F
    to a*s + b*s^3 + c*s^5 with Muon's (3.4445, -4.7750, 2.0315). The 5-step bounds above still
    pass with c = 2.3; this does not."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 16, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -2, 16, dtype=torch.float64)
    g = u @ torch.diag(s) @ v.T
    x = s / s.norm()
    want = u @ torch.diag(3.4445 * x - 4.7750 * x ** 3 + 2.0315 * x ** 5) @ v.T
    for t, w in ((g, want), (g.T, want.T)):  # wide and tall
        got = hw2.orthogonalize(t.float(), 1).double()
        assert torch.allclose(got, w, atol=2e-6), float((got - w).abs().max())


@pytest.mark.parametrize("dtype,tol", [("float16", 3e-3), ("bfloat16", 2e-2)])
def test_orthogonalize_in_half_precision_even_beyond_fp16s_range(dtype, tol):
    """On a GPU the iterations run in the run's half type (newton_schulz_dtype). A raw step
    whose entries exceed fp16's range (65504) must not overflow: it is scaled to norm 1 in fp32
    first. fp16 lands ~8x closer to fp32 than bf16 (3 more mantissa bits): measured 1e-3 vs 8e-3."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 64, 576, generator=gen) * 1e6  # a stack, as MuonSGD batches filters of one shape
    assert g.abs().max() > 65504
    ref = hw2.orthogonalize(g, 3)
    o = hw2.orthogonalize(g, 3, getattr(torch, dtype))
    assert o.dtype == torch.float32 and o.isfinite().all()  # handed back in the step's dtype
    assert float((o - ref).norm() / ref.norm()) < tol


def test_newton_schulz_dtype_follows_the_runs_half_type_on_a_gpu(tmp_path, monkeypatch):
    """fp16 on a GPU run in fp16 (every GPU's default, and a T4 has no bf16 tensor cores), bf16 in
    a bf16 run, fp32 on the CPU; and train() hands it to every Muon step."""
    assert hw2.newton_schulz_dtype("cuda", "fp16") == "float16"
    assert hw2.newton_schulz_dtype("cuda", "bf16") == "bfloat16"
    assert hw2.newton_schulz_dtype("cuda", "fp32") == "float32"
    assert hw2.newton_schulz_dtype("cpu", "bf16") == hw2.newton_schulz_dtype("cpu", "fp32") == "float32"
    seen, real = [], hw2.orthogonalize
    monkeypatch.setattr(hw2, "orthogonalize", lambda g, steps, dtype=torch.float32: seen.append(dtype) or real(g, steps, dtype))
    monkeypatch.setattr(hw2, "newton_schulz_dtype", lambda device, precision: "float16")  # as on a GPU in fp16
    hw2.train(train_data(), dict(hw2.PRESETS["smoke"], **MUON), CPU, train_cfg(tmp_path), 1, 32, log=quiet)
    assert len(seen) == 10 * 4 and set(seen) == {torch.float16}  # 10 steps × 4 filter shapes (smoke net)


def _model_and_grads(seed=0):
    torch.manual_seed(seed)
    model = hw2.Net((8, 16, 16))
    grads = [{n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad} for _ in range(2)]
    return model, grads


def _two_steps(model, opt, grads):
    for g in grads:
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.grad = g[n].clone()
        opt.step()


def test_muon_step_matches_a_hand_computation_and_leaves_the_rest_to_sgd():
    hp = dict(hw2.PRESETS["smoke"], **MUON)
    model, grads = _model_and_grads()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = hw2.make_optimizer(model, hp, 32)
    muon_names = [n for n, p in model.named_parameters() if p.requires_grad and p.dim() == 4]
    assert len(muon_names) == 9 and "whiten.weight" not in muon_names  # 3 convs per group; the stem is fixed
    _two_steps(model, opt, grads)

    lr, m = MUON["muon_lr"], MUON["muon_momentum"]
    for n in muon_names:  # by hand: Nesterov momentum, weight reset to norm sqrt(out), orthogonalised step
        w, g1, g2 = w0[n], grads[0][n], grads[1][n]
        out = w.size(0)
        w = w * out ** 0.5 / w.norm() - lr * hw2.orthogonalize((g1 + m * g1).reshape(out, -1), 3).view_as(w)
        buf = m * g1 + g2
        w = w * out ** 0.5 / w.norm() - lr * hw2.orthogonalize((g2 + m * buf).reshape(out, -1), 3).view_as(w)
        assert torch.allclose(dict(model.named_parameters())[n], w, atol=1e-6), n

    # every other parameter: exactly what plain SGD (the preset without Muon) does with the same gradients
    ref, _ = _model_and_grads()
    ref_opt = hw2.make_optimizer(ref, dict(hw2.PRESETS["smoke"]), 32)
    assert type(ref_opt) is torch.optim.SGD
    _two_steps(ref, ref_opt, grads)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if n not in muon_names:
            assert torch.equal(p, q), n
        elif p.requires_grad:
            assert not torch.allclose(p, q), n  # positive control: Muon did change the filters


def test_filter_scale_does_not_change_the_net_so_muon_may_reset_it():
    """Every filter Muon renormalises is followed by BatchNorm (through a max-pool at most), so
    its scale is invisible in the output; the head's scale, which Muon leaves alone, is not."""
    torch.manual_seed(0)
    model = hw2.Net((8, 16, 16)).train()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for n, p in model.named_parameters():
            if p.requires_grad and p.dim() == 4:
                p.mul_(3.7)
        assert torch.allclose(model(x), ref, atol=1e-4, rtol=1e-4)
        model.head.weight.mul_(3.7)
        assert not torch.allclose(model(x), ref, atol=1e-2)


def test_muon_state_is_in_the_checkpointed_optimizer_state():
    """Resume restores the momentum buffers from opt.state_dict(): they must be in it (the
    bitwise resume test in test_recipe.py runs the Muon recipe end to end)."""
    hp = dict(hw2.PRESETS["smoke"], **MUON)
    model, grads = _model_and_grads()
    opt = hw2.make_optimizer(model, hp, 32)
    _two_steps(model, opt, grads)
    state = opt.state_dict()
    bufs = [s["muon_momentum"] for s in state["state"].values() if "muon_momentum" in s]
    assert len(bufs) == 9
    fresh = hw2.make_optimizer(hw2.Net((8, 16, 16)), hp, 32)
    fresh.load_state_dict(state)
    assert sum("muon_momentum" in s for s in fresh.state.values()) == 9


def test_muon_flops_are_counted_by_hand():
    """Newton-Schulz on an m x n filter matrix (m <= n): per iteration x xᵀ (2m²n), s s (2m³) and
    (..) x (2m²n) FLOPs; a tall one is transposed first. Summed over the 9 filters, 3 iterations."""
    hp = dict(hw2.PRESETS["smoke"], **MUON)
    model = hw2.Net(hp["widths"], hp["residual"])
    by_hand = 0
    for p in model.parameters():
        if p.requires_grad and p.dim() == 4:
            m, n = sorted((p.shape[0], p[0].numel()))
            by_hand += 3 * (4 * m * m * n + 2 * m ** 3)
    assert hw2.count_optimizer_flops(hp) == by_hand > 0
    assert hw2.count_optimizer_flops(dict(hw2.PRESETS["smoke"])) == 0  # plain SGD
    run = hw2.count_run_flops(hp, 2, 320, batch_size=32)
    assert run["optimizer_run"] == 2 * 10 * by_hand


def test_optimizer_flag_overrides_the_preset(monkeypatch):
    cpu = dict(device="cpu", precision="fp32")
    fast, full = hw2.PRESETS["fast"], hw2.PRESETS["full"]
    assert hw2.optimizer_name(hw2.preset_hparams("fast", cpu)) == "muon"
    assert hw2.preset_hparams("fast", cpu, "preset") == fast
    sgd = hw2.preset_hparams("fast", cpu, "sgd")
    assert hw2.optimizer_name(sgd) == "sgd" and type(hw2.make_optimizer(hw2.Net(sgd["widths"]), sgd, 1024)) is torch.optim.SGD
    # full has its own (smaller) Muon step, which --optimizer muon keeps; sgd drops it
    assert hw2.preset_hparams("full", cpu, "muon") == full and 0 < full["muon_lr"] < fast["muon_lr"]
    assert hw2.optimizer_name(hw2.preset_hparams("full", cpu, "sgd")) == "sgd"
    # a preset on SGD gets fast's Muon settings
    quick = hw2.preset_hparams("quick", cpu)
    assert hw2.optimizer_name(quick) == "sgd"
    assert hw2.preset_hparams("quick", cpu, "muon") == dict(quick, muon_lr=fast["muon_lr"],
                                                             muon_momentum=fast["muon_momentum"])
    monkeypatch.setenv("HW2_OPTIMIZER", "sgd")
    assert hw2.parse_config([]).optimizer == "sgd"
    assert hw2.parse_config(["--optimizer", "muon"]).optimizer == "muon"
    monkeypatch.setenv("HW2_OPTIMIZER", "adam")
    with pytest.raises(hw2.HW2Error, match="HW2_OPTIMIZER"):
        hw2.parse_config([])


def test_resume_refuses_a_checkpoint_of_other_widths(tmp_path):
    # --widths changes the weights' shapes: refused with the one-line "another run" error, not a
    # load_state_dict size-mismatch traceback
    hp = dict(hw2.PRESETS["smoke"])
    hw2.train(train_data(), hp, CPU, train_cfg(tmp_path), 1, 32, log=quiet)
    with pytest.raises(hw2.HW2Error, match="from another run"):
        hw2.train(train_data(), dict(hp, widths=(8, 16, 32)), CPU, train_cfg(tmp_path, resume=True), 1, 32, log=quiet)
    hw2.train(train_data(), hp, CPU, train_cfg(tmp_path, resume=True), 1, 32, log=quiet)  # control


def test_resume_refuses_a_checkpoint_of_the_other_optimizer(tmp_path):
    sgd = dict(hw2.PRESETS["smoke"])
    hw2.train(train_data(), sgd, CPU, train_cfg(tmp_path), 1, 32, log=quiet)
    with pytest.raises(hw2.HW2Error, match="from another run"):
        hw2.train(train_data(), dict(sgd, **MUON), CPU, train_cfg(tmp_path, resume=True), 1, 32, log=quiet)


# ------------------------------------------------ fp16: GradScaler without a host sync per step
def _count_syncs(fn):
    """How often fn makes the host wait for the device: .item() and friends all dispatch
    aten._local_scalar_dense (on a GPU, a cudaStreamSynchronize each)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def _scaled_steps(model, opt, scaler, grads, poison=None):
    """Each step as GradScaler runs it in training: scaled gradients in, scaler.step, update.
    `poison` (a parameter name) gets an inf in its gradient at the second step."""
    for i, g in enumerate(grads):
        scale = scaler.scale(torch.ones(()))  # the scale as a tensor (get_scale() would sync)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.grad = g[n].clone() * scale  # what backward of scaler.scale(loss) gives
                if poison == n and i == 1:
                    p.grad.view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()


@needs_cpu_fused_sgd
@pytest.mark.parametrize("optimizer", ["muon", "sgd"])
def test_fused_fp16_step_equals_the_unscaled_step(optimizer):
    """The fp16 path (fused=True: SGD's fused kernel, Muon unscaling itself) gives the weights and
    momentum that the plain optimizer gives with the unscaled gradients."""
    hp = dict(hw2.PRESETS["smoke"], **(MUON if optimizer == "muon" else {}))
    model, grads = _model_and_grads()
    opt = hw2.make_optimizer(model, hp, 32, fused=True)
    assert opt._step_supports_amp_scaling  # GradScaler hands it grad_scale/found_inf, no .item()
    _scaled_steps(model, opt, torch.amp.GradScaler("cpu", init_scale=1024.0), grads)
    ref, _ = _model_and_grads()
    ref_opt = hw2.make_optimizer(ref, hp, 32)
    _two_steps(ref, ref_opt, grads)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-5), n
    if optimizer == "muon":
        bufs = [s["muon_momentum"] for s in opt.state.values() if "muon_momentum" in s]
        ref_bufs = [s["muon_momentum"] for s in ref_opt.state.values() if "muon_momentum" in s]
        assert len(bufs) == 9 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(bufs, ref_bufs))


@needs_cpu_fused_sgd
@pytest.mark.parametrize("poison", ["groups.1.conv2.weight", "head.weight"])  # a Muon filter, an SGD weight
def test_fused_fp16_step_skips_an_overflow_on_the_device(poison):
    """An inf anywhere skips the whole step, Muon's filters and momentum included, and halves
    the scale, as GradScaler's own skip does, but decided on the device, without a host sync."""
    hp = dict(hw2.PRESETS["smoke"], **MUON)
    model, grads = _model_and_grads()
    opt = hw2.make_optimizer(model, hp, 32, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _scaled_steps(model, opt, scaler, grads[:1])

    assert _count_syncs(lambda: _scaled_steps(model, opt, scaler, [grads[0], grads[1]], poison=poison)) == 0
    # step 2 of that call (the poisoned one) was skipped: the weights are those after its step 1
    redo, _ = _model_and_grads()
    redo_opt = hw2.make_optimizer(redo, hp, 32, fused=True)
    _scaled_steps(redo, redo_opt, torch.amp.GradScaler("cpu", init_scale=1024.0), [grads[0], grads[0]])
    for (n, p), q in zip(model.named_parameters(), redo.parameters()):
        assert torch.equal(p, q), n
    assert scaler.get_scale() == 512.0
    for a, b in zip(opt.state.values(), redo_opt.state.values()):  # momentum too, Muon's and SGD's
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


@needs_cpu_fp16
def test_fp16_training_syncs_once_per_epoch_not_per_step(tmp_path):
    """train() in fp16 (on the CPU here; on a GPU the same code): GradScaler's overflow check
    stays on the device, so the host waits only for the epoch's totals, not at every step."""
    fp16 = dict(device="cpu", precision="fp16", compile=False)
    counts = {}
    for n_train in (320, 640):  # 10 and 20 steps per epoch
        hp = dict(hw2.PRESETS["smoke"], **MUON)
        (tmp_path / str(n_train)).mkdir()
        stats = {}
        counts[n_train] = _count_syncs(lambda: hw2.train(
            train_data(n_train=n_train), hp, fp16, train_cfg(tmp_path / str(n_train)), 2, 32, log=quiet, stats=stats))
        assert stats["fp16_scale"]["end"] == stats["fp16_scale"]["init"]  # no overflow here
    # independent of the steps, none per step: 3 per epoch (its loss and accuracy, and the loss
    # scale that check_still_learning reads), 2 for the scaler's state in the first epoch's
    # checkpoint, 1 for its final scale in stats
    assert counts[320] == counts[640] == 9, counts


# ------------------------------------------------ Muon's step replayed from a CUDA graph (GPU runs)
def _stand_in_graph(recorded):
    """capture_cuda_graph's contract without a GPU: warm_up runs once, and replay() re-runs the
    recorded call on the tensors it was recorded with (what a CUDA graph's replay does)."""
    def capture(warm_up, fn):
        warm_up()
        recorded.append(fn)
        return type("Graph", (), {"replay": staticmethod(fn)})()
    return capture


@pytest.mark.parametrize("fp16", [pytest.param(True, marks=needs_cpu_fused_sgd), False])
def test_captured_muon_step_refills_its_inputs_every_step(monkeypatch, fp16):
    """On a GPU, Muon's update is recorded once as a CUDA graph and replayed: the replay reads
    only the tensors it was recorded on, so each step must copy its own gradients, learning rate
    and GradScaler state into them. Here (no GPU) a stand-in graph re-runs the recorded call on
    the recorded tensors, which is what a replay does. Over steps with a changing lr, an
    overflowed step, and an optimizer state reloaded as on --resume (new momentum buffers, so a
    new recording), the weights and momentum must equal the eager optimizer's bit for bit. A
    replay of stale inputs, or a warm-up that moved the real weights, would break that."""
    recorded = []
    monkeypatch.setattr(hw2, "capture_cuda_graph", _stand_in_graph(recorded))
    hp = dict(hw2.PRESETS["smoke"], **MUON)
    model, grads = _model_and_grads()
    ref, _ = _model_and_grads()
    opt = hw2.make_optimizer(model, hp, 32, fused=fp16, cuda_graph=True)
    ref_opt = hw2.make_optimizer(ref, hp, 32, fused=fp16)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(2)]
    schedule = [(grads[0], 1.0, None), (grads[1], 0.5, None), (grads[0], 0.7, "groups.1.conv2.weight"),
                (grads[1], 0.3, None)]
    for k, (g, f, poison) in enumerate(schedule):
        if k == 3:  # --resume: the optimizer state comes back as new tensors (torch.load's)
            for o in (opt, ref_opt):
                o.load_state_dict(copy.deepcopy(o.state_dict()))
        for m, o, scaler in ((model, opt, scalers[0]), (ref, ref_opt, scalers[1])):
            for group in o.param_groups:
                group["lr"] = group["base_lr"] * f
            if fp16:
                _scaled_steps(m, o, scaler, [g, g] if poison else [g], poison=poison)
            else:
                _two_steps(m, o, [g])
    assert len(recorded) == 2 and len(opt.graphs) == 1  # once, then again for the new buffers
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
    bufs = [s["muon_momentum"] for s in opt.state.values() if "muon_momentum" in s]
    ref_bufs = [s["muon_momentum"] for s in ref_opt.state.values() if "muon_momentum" in s]
    assert len(bufs) == 9 and all(torch.equal(a, b) for a, b in zip(bufs, ref_bufs))
    if fp16:
        assert scalers[0].get_scale() == scalers[1].get_scale() == 512.0  # the overflow was seen


def test_captured_muon_step_falls_back_to_eager_if_the_capture_fails(monkeypatch, capsys):
    """A CUDA that refuses the recording (a driver, an op) costs speed, not the run: one note,
    and every step from then on is the eager update, from weights that have not moved."""
    def refuse(warm_up, fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(hw2, "capture_cuda_graph", refuse)
    hp = dict(hw2.PRESETS["smoke"], **MUON)
    model, grads = _model_and_grads()
    ref, _ = _model_and_grads()
    opt = hw2.make_optimizer(model, hp, 32, cuda_graph=True)
    _two_steps(model, opt, grads)
    _two_steps(ref, hw2.make_optimizer(ref, hp, 32), grads)
    assert not opt.cuda_graph and not opt.graphs
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    err = capsys.readouterr().err
    assert err.count("hw2: note: Muon's step could not be captured") == 1 and "runs eagerly" in err


def test_train_with_muons_step_replayed_gives_the_eager_model(tmp_path, monkeypatch):
    """train() end to end, as on a GPU with --cuda-graph on (the graph a stand-in that replays the
    recorded call): the same losses, weights and predictions as the eager run, and `stats` says
    the step was replayed. On the CPU train() never asks for a graph: that run is the eager one."""
    hp = dict(hw2.PRESETS["smoke"], **MUON)
    runs, real = {}, hw2.make_optimizer
    for graph in (False, True):
        stats, recorded = {}, []
        if graph:
            monkeypatch.setattr(hw2, "capture_cuda_graph", _stand_in_graph(recorded))
            monkeypatch.setattr(hw2, "make_optimizer", lambda *a, **kw: real(*a, **dict(kw, cuda_graph=True)))
        (tmp_path / str(graph)).mkdir()
        model, history = hw2.train(train_data(), hp, CPU,
                                   train_cfg(tmp_path / str(graph)), 2, 32, log=quiet, stats=stats)
        runs[graph] = (model, history, stats["cuda_graph"], len(recorded))
    (eager, h0, g0, _), (replayed, h1, g1, n_recorded) = runs[False], runs[True]
    assert (g0, g1, n_recorded) == (False, True, 1)  # recorded once, replayed for every step after
    assert [r["train_loss"] for r in h0] == [r["train_loss"] for r in h1]
    for (n, p), q in zip(eager.state_dict().items(), replayed.state_dict().values()):
        assert torch.equal(p, q), n


@needs_cpu_fused_sgd
def test_captured_muon_step_skips_an_overflow_flagged_without_a_scale(monkeypatch):
    """After GradScaler.unscale_ (to clip gradients, say) the optimizer is handed the overflow flag
    but no scale. A replayed step must still skip an overflowed step, as the eager one does."""
    hp = dict(hw2.PRESETS["smoke"], **MUON)
    models = {}
    for graph in (False, True):
        recorded = []
        monkeypatch.setattr(hw2, "capture_cuda_graph", _stand_in_graph(recorded))
        model, grads = _model_and_grads()
        opt = hw2.make_optimizer(model, hp, 32, fused=True, cuda_graph=graph)
        for g, flag in ((grads[0], 0.0), (grads[1], 1.0), (grads[1], 0.0)):
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.grad = g[n].clone()
            opt.found_inf = torch.tensor(flag)  # what GradScaler.step sets after unscale_
            opt.step()
            del opt.found_inf
        assert len(recorded) == graph
        models[graph] = model
    skipped, _ = _model_and_grads()  # the same two steps without the flagged one
    _two_steps(skipped, hw2.make_optimizer(skipped, hp, 32, fused=True), grads)
    for (n, p), q, r in zip(models[True].named_parameters(), models[False].parameters(), skipped.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r), n


def test_out_of_memory_while_recording_reaches_the_retry(monkeypatch):
    """Out of memory during the recording is not a CUDA that cannot record: it goes up to
    train_with_oom_retry (which retries at half the batch), instead of turning into eager steps."""
    def out_of_memory(warm_up, fn):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(hw2, "capture_cuda_graph", out_of_memory)
    model, grads = _model_and_grads()
    opt = hw2.make_optimizer(model, dict(hw2.PRESETS["smoke"], **MUON), 32, cuda_graph=True)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        _two_steps(model, opt, grads)
    assert opt.cuda_graph  # not switched off: the retry builds a new optimizer anyway


def test_every_group_follows_the_schedule_from_its_own_base_lr(tmp_path, monkeypatch):
    """In a real training run, each step's lr of every group is its own peak times lr_factor:
    Muon's filters from muon_lr, the head from lr (in PyTorch units), the BatchNorm biases
    bias_lr_scale times that; the epoch line's lr is the head's, as the last step left it."""
    hp = dict(hw2.PRESETS["smoke"], **MUON)
    kilo = sgd_kilo(hp["momentum"])
    peak = dict(muon=hp["muon_lr"], others=hp["lr"] / kilo, biases=hp["lr"] / kilo * hp["bias_lr_scale"])
    seen, real_step = [], hw2.MuonSGD.step

    def spy(self, closure=None):
        biases, others, muon = self.param_groups  # make_optimizer's order
        assert muon.get("muon") and not others.get("muon") and not biases.get("muon")
        seen.append(dict(biases=biases["lr"], others=others["lr"], muon=muon["lr"]))
        return real_step(self, closure)

    monkeypatch.setattr(hw2.MuonSGD, "step", spy)
    data = train_data(n_train=256, n_val=0)
    _, history = hw2.train(data, hp, CPU, train_cfg(tmp_path),
                           epochs=2, batch_size=32, log=quiet)
    total = 2 * 256 // 32
    assert len(seen) == total
    for step, lrs in enumerate(seen):
        f = hw2.lr_factor(step, total, hp["warmup"])
        assert lrs == pytest.approx({k: v * f for k, v in peak.items()}, rel=1e-12), step
    assert [r["lr"] for r in history] == pytest.approx([seen[7]["others"], seen[15]["others"]], rel=1e-12)

"""Problem 4 pipeline on real code paths: loader, test.npy layouts, augmentation, model, TTA,
submission format, and a smoke training run whose loss falls."""
import argparse
import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

import hw2
from conftest import CPU, cifar_with_test_batch, run_hw2, train_data


# ---------------------------------------------------------------- data loading
def test_loader_reads_real_batches(cifar_dir):
    x, y, test = hw2.load_cifar_train(cifar_dir)
    assert x.shape == (50000, 3, 32, 32) and x.dtype == np.uint8
    assert y.shape == (50000,) and set(np.unique(y)) == set(range(10))
    assert np.bincount(y).min() == 5000  # the JPEG copy is class-balanced
    assert 80 < x.mean() < 160 and x.std() > 40  # real pixels, not zeros or noise
    # Same pixels and order as a plain reader of the file we just made ourselves (trusted here).
    import pickle
    with open(os.path.join(cifar_dir, "data_batch_2"), "rb") as f:
        ref = pickle.load(f, encoding="bytes")
    assert np.array_equal(ref[b"data"].reshape(-1, 3, 32, 32), x[10000:20000])
    assert ref[b"labels"] == y[10000:20000].tolist()


def test_find_data_dir_accepts_folder_or_parent(tiny_cifar_dir):
    assert hw2.find_data_dir(tiny_cifar_dir)[0] == tiny_cifar_dir
    assert hw2.find_data_dir(os.path.dirname(tiny_cifar_dir))[0] == tiny_cifar_dir


def test_val_split_is_fixed_and_disjoint():
    x = np.arange(1000).reshape(1000, 1, 1, 1)  # each image holds its own index
    y = np.arange(1000) * 7  # and each label another function of it
    a = hw2.split_train_val(x, y, 100)
    b = hw2.split_train_val(x, y, 100)
    assert np.array_equal(a[2], b[2])
    assert len(a[0]) == 900 and len(a[2]) == 100
    ids_train, ids_val = a[0].ravel(), a[2].ravel()
    assert sorted(np.concatenate([ids_train, ids_val]).tolist()) == list(range(1000))  # disjoint, complete
    assert np.array_equal(a[1], ids_train * 7) and np.array_equal(a[3], ids_val * 7)  # labels travel along
    assert sorted(ids_val.tolist()) != list(range(100))  # a shuffled hold-out, not the first 100


def test_val_size_must_leave_an_image_to_train_on():
    x, y = np.zeros((50, 3, 32, 32), np.uint8), np.arange(50) % 10
    with pytest.raises(hw2.HW2Error, match="--val-size 50: must be below the 50"):
        hw2.split_train_val(x, y, 50)
    assert [len(part) for part in hw2.split_train_val(x, y, 49)] == [1, 1, 49, 49]


def test_a_folder_smaller_than_the_default_hold_out_is_named_not_the_flag(tmp_path, no_hw2_env):
    # 5 x 5 images and no --val-size: the folder is what is small (the user passed no flag), and
    # the message says what to pass; with --val-size 5 the same folder loads
    from conftest import write_cifar_batch
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    g = np.random.default_rng(0)
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", g, 5)
    cfg = hw2.parse_config(["--preset", "smoke", "--data-dir", str(folder)])
    with pytest.raises(hw2.HW2Error, match=re.escape(f"{folder}: only 25 training images, not more than the 128 ")
                       + ".*pass a smaller --val-size$"):
        hw2.load_data(cfg, hw2.PRESETS["smoke"])
    cfg = hw2.parse_config(["--preset", "smoke", "--data-dir", str(folder), "--val-size", "5"])
    assert len(hw2.load_data(cfg, hw2.PRESETS["smoke"])["val_x"]) == 5


# ---------------------------------------------------------------- test.npy layouts
@pytest.fixture
def images():
    return np.random.default_rng(1).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("layout", ["nhwc_uint8", "nchw_uint8", "nhwc_float", "nchw_float32"])
def test_test_npy_layouts(tmp_path, images, layout):
    arr = {"nhwc_uint8": images, "nchw_uint8": images.transpose(0, 3, 1, 2),
           "nhwc_float": images / 255.0,
           "nchw_float32": (images.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)}[layout]
    path = tmp_path / "test.npy"
    np.save(path, arr)
    got = hw2.read_test_npy(str(path))
    assert got.dtype == np.uint8 and got.shape == (7, 3, 32, 32)
    assert np.array_equal(got, images.transpose(0, 3, 1, 2))  # order and pixels preserved


def test_test_npy_rejects_wrong_layout(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros((4, 32, 3, 32), np.uint8))
    with pytest.raises(hw2.HW2Error, match="shape"):
        hw2.read_test_npy(str(tmp_path / "t.npy"))


def test_integer_test_npy_is_0_to_255_inclusive(tmp_path):
    """255 is a pixel; 256 (which astype(uint8) would wrap to 0) and -1 are not."""
    ok = np.full((2, 32, 32, 3), 255, np.int16)
    ok[0] = 0
    np.save(tmp_path / "ok.npy", ok)
    got = hw2.read_test_npy(str(tmp_path / "ok.npy"))
    assert got.dtype == np.uint8 and got[0].max() == 0 and got[1].min() == 255
    for bad in (256, -1):
        arr = np.zeros((2, 32, 32, 3), np.int16)
        arr[1, 5, 5, 1] = bad
        np.save(tmp_path / "bad.npy", arr)
        with pytest.raises(hw2.HW2Error, match="integer values outside 0..255"):
            hw2.read_test_npy(str(tmp_path / "bad.npy"))


def test_float_test_npy_is_rounded_to_the_nearest_level(tmp_path):
    """Float pixels between two of the 256 levels go to the nearer one (k + 0.6 -> k + 1), not down."""
    k = np.arange(2 * 3 * 32 * 32).reshape(2, 3, 32, 32) % 255
    frac = np.where(np.arange(k.size).reshape(k.shape) % 2 == 0, 0.4, 0.6)
    np.save(tmp_path / "t.npy", (k + frac) / 255.0)
    assert np.array_equal(hw2.read_test_npy(str(tmp_path / "t.npy")), (k + (frac > 0.5)).astype(np.uint8))


# ---------------------------------------------------------------- augmentation
def _batch(n=64):
    g = np.random.default_rng(2)
    return torch.from_numpy(g.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))


def test_normalize_is_float_and_centred():
    x = hw2.normalize(_batch())
    assert x.dtype == torch.float32 and x.shape == (64, 3, 32, 32)
    assert hw2.normalize(_batch(), torch.float16).dtype == torch.float16
    # centred and scaled per channel by CIFAR-10's published pixel statistics (0-1 scale)
    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
    u8 = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 32, 32)
    want = (np.array([0, 128, 255])[:, None] / 255 - mean) / std  # [value, channel]
    got = hw2.normalize(u8.contiguous()).mean(dim=(2, 3)).numpy()
    assert np.allclose(got, want, atol=1e-5), (got, want)


def _crop_offsets(out, x, pad, n):
    """(dy, dx) of each of the first n output images within its reflect-padded input: each must be
    exactly one of the (2*pad+1)^2 crops (random images, so no two crops coincide)."""
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="reflect")
    size, found = x.shape[-1], []
    for i in range(n):
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if torch.equal(out[i], padded[i, :, dy:dy + size, dx:dx + size])]
        assert len(hits) == 1, (i, hits)
        found.append(hits[0])
    return found


def test_translate_moves_pixels_within_the_reflect_pad():
    x = hw2.normalize(_batch())
    g = torch.Generator().manual_seed(0)
    out = hw2.random_translate(x, 2, g)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)
    _crop_offsets(out, x, 2, 8)  # every output image is one of the 25 shifted crops
    assert torch.equal(hw2.random_translate(x, 0, g), x)


def test_translate_draws_every_offset_with_rows_and_columns_apart():
    """All 25 crops of a 2-pixel pad occur, none far more often than 1/25 of the time (a draw
    over 0..2*pad-1 never shifts by +pad; dx = dy only shifts along the diagonal)."""
    pad, n = 2, 500
    x = torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    out = hw2.random_translate(x, pad, torch.Generator().manual_seed(1))
    counts = np.zeros((2 * pad + 1, 2 * pad + 1), int)
    for offset in _crop_offsets(out, x, pad, n):
        counts[offset] += 1
    assert (counts > 0).all(), counts  # 500 draws over 25 cells: P(one empty) ~ 1e-8
    assert counts.max() < 3 * n / 25, counts


def test_alternating_flip_flips_each_image_every_other_epoch():
    u8 = _batch(16)
    base = torch.rand(16, generator=torch.Generator().manual_seed(0)) < 0.5
    hp = dict(translate=0, cutout=0)
    g = torch.Generator().manual_seed(0)
    e0, e1 = hw2.augment_epoch(u8, 0, base, hp, g), hw2.augment_epoch(u8, 1, base, hp, g)
    plain = hw2.normalize(u8)
    for i in range(16):
        flipped0 = torch.equal(e0[i], plain[i].flip(-1))
        assert flipped0 == bool(base[i]) and torch.equal(e1[i], e0[i].flip(-1))
    assert 0 < int(base.sum()) < 16


def test_cutout_zeroes_one_square_per_image():
    x = hw2.normalize(_batch()) + 10  # no natural zeros
    out = hw2.cutout(x, 8, torch.Generator().manual_seed(0))
    zero = (out == 0).all(1)  # N×H×W
    assert (zero.sum((1, 2)) == 64).all()
    assert out.dtype == x.dtype and out.shape == x.shape


def test_cutout_square_reaches_every_row_and_column():
    """The square's corner takes all h-size+1 rows and w-size+1 columns, so it can touch each edge
    (a draw over 0..w-size-1 never reaches the right or bottom edge)."""
    n, size = 400, 8
    out = hw2.cutout(torch.ones(n, 3, 12, 12), size, torch.Generator().manual_seed(0))
    zero = (out == 0).all(1)
    first_row = zero.any(2).float().argmax(1)
    first_col = zero.any(1).float().argmax(1)
    assert set(first_row.tolist()) == set(range(12 - size + 1))
    assert set(first_col.tolist()) == set(range(12 - size + 1))


def test_normalised_real_training_images_have_zero_mean_and_unit_spread(cifar_dir):
    """Per channel, over real training images: mean ~0 and std ~1, which CIFAR_MEAN/CIFAR_STD in
    the wrong channel order (BGR) or swapped would break."""
    x, _, _ = hw2.load_cifar_train(cifar_dir)
    z = hw2.normalize(torch.from_numpy(x[::5]))  # 10,000 images, ~0.1 GB as float
    mean, std = z.mean((0, 2, 3)), z.std((0, 2, 3))
    assert mean.abs().max() < 0.03, mean
    assert (std - 1).abs().max() < 0.03, std


# ---------------------------------------------------------------- model
def test_model_forward_backward_and_residual_shapes():
    model = hw2.Net((8, 16, 16))
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert model.groups[2].conv3.weight.grad is not None and x.grad.abs().sum() > 0
    assert model.whiten.weight.grad is None  # the whitening filters are frozen


def _whitened_stem(n):
    """The 2x2 stem, whitened on n random images whose horizontal neighbours correlate."""
    imgs = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    imgs = imgs + 0.8 * imgs.roll(1, dims=-1)
    conv = hw2.Conv(3, 24, kernel_size=2, padding=0, bias=True)
    hw2.init_whitening(conv, imgs)
    return imgs, conv


def test_whitening_decorrelates_patches():
    imgs, conv = _whitened_stem(256)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(imgs, conv.weight[:12])
    cov = torch.cov(out.permute(1, 0, 2, 3).reshape(12, -1))
    assert torch.allclose(cov, torch.eye(12), atol=0.05)


def test_whitening_filters_are_the_patch_eigenvectors_and_their_negatives():
    """The stem's 24 filters: the 12 eigenvectors of the 2x2-patch covariance scaled by
    1/sqrt(eigenvalue + 5e-4), largest first, then the same 12 negated (GELU follows, so both
    signs of each direction pass)."""
    imgs, conv = _whitened_stem(64)
    w = conv.weight.detach()
    assert torch.equal(w[12:], -w[:12])
    patches = torch.nn.functional.unfold(imgs, 2).transpose(1, 2).reshape(-1, 12)  # channel-major, as the conv
    val, vec = torch.linalg.eigh((patches.T @ patches / len(patches)).double())
    scale = 1 / torch.sqrt(val.flip(0) + 5e-4)
    assert torch.allclose(w[:12].reshape(12, -1).double().norm(dim=1), scale, rtol=1e-3)
    cos = (w[:12].reshape(12, -1).double() @ vec.flip(1)).abs() / scale[:, None]  # |<filter_i, eigvec_j>|
    assert torch.allclose(cos.diagonal(), torch.ones(12, dtype=torch.float64), atol=1e-3)


def test_net_forward_is_stem_groups_with_skips_a_global_max_and_a_ninth():
    """Net's logits recomputed with torch.nn.functional: 2x2 stem + GELU; per group conv ->
    2x2 max-pool -> BN -> GELU, then (where residual) two conv-BN with GELUs and a skip around
    them; a global max; a bias-free head divided by 9."""
    F = torch.nn.functional
    torch.manual_seed(0)
    widths, residual = (8, 12, 16), (True, False, True)
    net = hw2.Net(widths, residual=residual)
    with torch.no_grad():  # non-trivial weights and BN statistics, so no term vanishes
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    net.eval()
    assert [hasattr(g, "conv2") for g in net.groups] == list(residual)
    x = torch.randn(3, 3, 32, 32)

    def bn(m, h):
        return F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    with torch.no_grad():
        h = F.gelu(F.conv2d(x, net.whiten.weight, net.whiten.bias))
        for grp, width, res in zip(net.groups, widths, residual):
            h = F.gelu(bn(grp.norm1, F.max_pool2d(F.conv2d(h, grp.conv1.weight, padding=1), 2)))
            if res:
                r = F.gelu(bn(grp.norm2, F.conv2d(h, grp.conv2.weight, padding=1)))
                h = F.gelu(bn(grp.norm3, F.conv2d(r, grp.conv3.weight, padding=1)) + h)
            assert h.shape[1] == width
        expected = h.amax(dim=(2, 3)) @ net.head.weight.T / 9
        got = net(x)
    assert net.head.bias is None
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_tta_averages_views():
    torch.manual_seed(0)
    model = hw2.Net((8, 16, 16)).eval()
    imgs = _batch(10).numpy()
    view = lambda a: hw2.predict_logits(model, np.ascontiguousarray(a), "cpu", "fp32", tta=0)
    l0, l1, l2 = (hw2.predict_logits(model, imgs, "cpu", "fp32", tta=t) for t in (0, 1, 2))
    assert torch.allclose(l0, view(imgs), atol=0)
    # level 1: the image and its mirror, weight 1/2 each
    mirror_pair = lambda a: 0.5 * view(a) + 0.5 * view(a[..., ::-1])
    assert torch.allclose(l1, mirror_pair(imgs), atol=1e-5)
    # level 2: that pair at weight 1/2, plus the pairs of the two 1-pixel diagonal shifts
    # (reflect-padded, cropped at offset (0, 0) and (2, 2)) at weight 1/4 each
    padded = np.pad(imgs, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    shifts = [padded[:, :, :32, :32], padded[:, :, 2:, 2:]]
    expected = 0.5 * mirror_pair(imgs) + 0.25 * mirror_pair(shifts[0]) + 0.25 * mirror_pair(shifts[1])
    assert torch.allclose(l2, expected, atol=1e-5)
    # the check can fail: other shifts or other weights give other logits
    wrong_shift = np.pad(imgs, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")[:, :, :32, 2:]
    assert not torch.allclose(l2, 0.5 * mirror_pair(imgs) + 0.25 * mirror_pair(shifts[0])
                              + 0.25 * mirror_pair(wrong_shift), atol=1e-5)
    assert not torch.allclose(l2, (mirror_pair(imgs) + mirror_pair(shifts[0]) + mirror_pair(shifts[1])) / 3,
                              atol=1e-5)
    # a mirror-symmetric score: TTA-1 logits are invariant to flipping the input (level 2 is not:
    # mirroring swaps its diagonal shifts for the other diagonal)
    flipped = hw2.predict_logits(model, imgs[..., ::-1].copy(), "cpu", "fp32", tta=1)
    assert torch.allclose(l1, flipped, atol=1e-5)


def test_prediction_keeps_the_test_order_across_chunks():
    """Several chunks and a short last one: row i of the logits is image i's own."""
    torch.manual_seed(0)
    model = hw2.Net((8, 16, 16)).eval()
    imgs = _batch(10).numpy()
    got = hw2.predict_logits(model, imgs, "cpu", "fp32", tta=0, batch_size=4, pad=False)
    with torch.no_grad():
        one_by_one = torch.cat([model(hw2.normalize(torch.from_numpy(imgs[i:i + 1]))) for i in range(10)])
    assert got.shape == (10, 10) and torch.allclose(got, one_by_one, atol=1e-5)


def test_prediction_pads_a_short_chunk_to_the_batch_shape(monkeypatch):
    # On a GPU, the last chunk is filled up to the training batch size, so that every
    # convolution sees one shape per run (one cuDNN autotune); the blank fill must change no logit
    torch.manual_seed(0)
    model = hw2.Net((8, 16, 16)).eval()
    imgs = _batch(10).numpy()
    shapes = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: shapes.append(tuple(x.shape)) or forward(x))
    plain = hw2.predict_logits(model, imgs, "cpu", "fp32", tta=2, batch_size=4, pad=False)
    assert sorted(set(shapes)) == [(2, 3, 32, 32), (4, 3, 32, 32)]
    shapes.clear()
    padded = hw2.predict_logits(model, imgs, "cpu", "fp32", tta=2, batch_size=4, pad=True)
    assert set(shapes) == {(4, 3, 32, 32)} and len(shapes) == 3 * 6  # 3 chunks, 6 views each
    assert padded.shape == (10, 10) and torch.allclose(padded, plain, atol=1e-5)
    shapes.clear()
    hw2.predict_logits(model, imgs[:3], "cpu", "fp32", batch_size=8, pad=True)  # fewer than a batch
    assert shapes == [(8, 3, 32, 32)]


def test_bn_stats_are_recomputed_from_whole_training_batches(monkeypatch):
    torch.manual_seed(0)
    model = hw2.Net((8, 16, 16))
    images = torch.from_numpy(_batch(100).numpy())
    shapes = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x: shapes.append(tuple(x.shape)) or forward(x))
    hw2.recompute_bn_stats(model, images, "cpu", "fp32", batch_size=16, n_images=60)
    assert shapes == [(16, 3, 32, 32)] * 4  # round(60 / 16) whole batches, no short one
    assert not model.training and model.groups[0].norm1.momentum == 0.1  # restored
    # the statistics are those of the 64 images, in train mode: a plain cumulative average
    norm = model.groups[0].norm1
    seen = []
    hook = norm.register_forward_hook(lambda m, inp, out: seen.append(inp[0].mean(dim=(0, 2, 3))))
    hw2.recompute_bn_stats(model, images, "cpu", "fp32", batch_size=16, n_images=60)
    hook.remove()
    assert torch.allclose(norm.running_mean, torch.stack(seen).mean(0), atol=1e-5)


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [hw2.lr_factor(s, 100, 0.1) for s in range(101)]
    assert f[0] == pytest.approx(0.2) and max(f) == pytest.approx(1.0)
    assert f.index(max(f)) == 10 and f[100] == 0.0
    # the warm-up is the first floor(total * warmup) steps: 27 of 100 at 0.275 (not 28)
    f = [hw2.lr_factor(s, 100, 0.275) for s in range(101)]
    assert f.index(max(f)) == 27 and f[26] < 1.0


def test_confusion_matrix_rows_are_true_classes():
    cm = hw2.confusion(np.array([1, 1, 2]), np.array([0, 1, 1]), k=3)  # (pred, true)
    assert cm.tolist() == [[0, 1, 0], [0, 1, 1], [0, 0, 0]]  # cm[true, pred]


def test_parameter_count_includes_the_frozen_ones():
    """metrics.json's `parameters` counts every parameter model.pt stores, the frozen whitening
    filters and BatchNorm scales too, by hand from the net's shape."""
    w = (8, 16, 32)
    m = hw2.Net(w, (True, True, True))
    convs = 24 * 3 * 2 * 2 + 24 + sum(9 * c_in * c_out + 2 * 9 * c_out * c_out
                                      for c_in, c_out in zip((24,) + w[:2], w))
    norms = 3 * 2 * sum(w)  # three BatchNorms per group, weight and bias each
    assert hw2.count_params(m) == convs + norms + 10 * w[-1]
    assert hw2.count_params(m) > sum(p.numel() for p in m.parameters() if p.requires_grad)


# ---------------------------------------------------------------- submission
def test_submission_default_format():
    sub = hw2.make_submission(np.array([3, 1, 4, 1, 5]))
    assert sub["columns"] == ["Id", "Category"]
    assert sub["ids"] == [0, 1, 2, 3, 4] and sub["labels"] == [3, 1, 4, 1, 5]


def test_submission_copies_sample_ids_and_class_names():
    sample = dict(columns=["id", "label"], ids=["2", "0", "1"], labels=["cat", "cat", "cat"])
    sub = hw2.make_submission(np.array([0, 1, 9]), sample)
    assert sub["columns"] == ["id", "label"]
    assert sub["ids"] == ["2", "0", "1"]
    assert sub["labels"] == ["truck", "airplane", "automobile"]  # id k -> image k


def test_submission_check_rejects_bad_labels():
    with pytest.raises(AssertionError, match="out of range"):
        hw2.check_submission(dict(columns=["Id", "Category"], ids=[0, 1], labels=[0, 10]), 2)
    with pytest.raises(AssertionError, match="rows"):
        hw2.check_submission(dict(columns=["Id", "Category"], ids=[0, 1], labels=[0, 1]), 3)
    with pytest.raises(AssertionError, match="not unique"):
        hw2.check_submission(dict(columns=["Id", "Category"], ids=["a", "a"], labels=[0, 1]), 2)
    with pytest.raises(AssertionError, match="unknown class names"):
        hw2.check_submission(dict(columns=["Id", "Category"], ids=[0, 1], labels=["cat", "kitten"]), 2)
    hw2.check_submission(dict(columns=["Id", "Category"], ids=[0, 1], labels=["cat", "truck"]), 2)  # control


# ---------------------------------------------------------------- training
def _cfg(tmp_path, **kw):
    base = dict(preset="smoke", seed=0, output_dir=str(tmp_path), resume=False, epochs=None)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("preset,scored", [("smoke", [True, True, True]), ("full", [True, True, True]),
                                           ("quick", [False, False, True]), ("fast", [False, False, True])])
def test_short_presets_score_the_hold_out_after_the_last_epoch_only(tmp_path, preset, scored):
    # quick (2 CPU cores) and fast (seconds on a GPU) can't spare an evaluation per epoch
    _, history = hw2.train(train_data(n_train=128, n_val=64), dict(hw2.PRESETS["smoke"]), CPU,
                           _cfg(tmp_path, preset=preset), epochs=3, batch_size=32, log=lambda s: None)
    assert [r["val_acc"] is not None for r in history] == scored


def test_smoke_training_loss_falls(tmp_path):
    x, y = hw2.synthetic_cifar(768, seed=0)
    data = dict(train_x=x[:640], train_y=y[:640], val_x=x[640:], val_y=y[640:])
    hp = dict(hw2.PRESETS["smoke"])
    model, history = hw2.train(data, hp, CPU, _cfg(tmp_path), epochs=6, batch_size=32, log=lambda s: None)
    losses = [r["train_loss"] for r in history]
    assert losses[-1] < 0.75 * losses[0], losses
    assert history[-1]["val_acc"] > 0.5  # ten learnable patterns: far above chance
    assert os.path.isfile(tmp_path / "checkpoint.pt")


def test_train_times_its_setup_apart_from_its_epochs(tmp_path, monkeypatch):
    """metrics.json splits the train time: the set-up before epoch 1 (upload, net, whitening,
    optimizer) is timed apart from the epochs, and the CPU never creates a CUDA context."""
    import time

    whiten, pause = hw2.init_whitening, 3.0  # far longer than a smoke epoch of 4 steps takes (~0.1 s)
    monkeypatch.setattr(hw2, "init_whitening", lambda *a: (time.sleep(pause), whiten(*a)))
    monkeypatch.setattr(torch.cuda, "init", lambda: pytest.fail("CUDA initialised on the CPU"))
    x, y = hw2.synthetic_cifar(256, seed=0)
    data = dict(train_x=x, train_y=y, val_x=x[:0], val_y=y[:0])
    stats = {}
    t0 = time.time()
    _, history = hw2.train(data, dict(hw2.PRESETS["smoke"]), CPU,
                           _cfg(tmp_path, checkpoint_every=1e9), epochs=2, batch_size=64, log=lambda s: None,
                           stats=stats)
    wall = time.time() - t0
    parts = stats["seconds"]
    assert parts["cuda_init"] < 0.01 and parts["setup"] >= pause
    assert all(r["seconds"] < pause for r in history), history  # the pause is in the set-up, in no epoch
    assert parts["cuda_init"] + parts["setup"] + sum(r["seconds"] for r in history) <= wall


def test_smoke_end_to_end_with_real_data(cifar_dir, tmp_path):
    test = np.random.default_rng(3).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "test.npy", test)
    out = tmp_path / "out"
    proc = run_hw2("--preset", "smoke", "--data-dir", cifar_dir, "--test-npy", tmp_path / "test.npy",
                   "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sub = pd.read_csv(out / "submission.csv")
    assert sub["Id"].tolist() == list(range(50)) and sub["Category"].between(0, 9).all()
    for name in ["answers.json", "metrics.json", "model.pt", "training_curves.png",
                 "confusion_matrix.png", "test_predictions.png"]:
        assert (out / name).is_file(), name
    assert "epoch train_loss" in proc.stdout and "done | preset smoke" in proc.stdout


def test_metrics_json_scores_the_labelled_test_set_and_adds_up(tmp_path, tiny_cifar_dir):
    """A folder with CIFAR's own labelled test_batch: metrics.json's test_acc is the written
    submission's accuracy on those labels, train_acc the last epoch's, and the phases' seconds
    add up to no more than the total."""
    folder = cifar_with_test_batch(tiny_cifar_dir, tmp_path)
    out = tmp_path / "out"
    proc = run_hw2("--preset", "smoke", "--data-dir", folder, "--output-dir", out, "--epochs", "2",
                   "--skip-answers", "--precision", "fp32", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    labels = hw2.read_cifar_batch(str(folder / "test_batch"))[1][:m["n_test"]]
    pred = pd.read_csv(out / "submission.csv")["Category"].to_numpy()
    assert len(pred) == m["n_test"] > 0
    assert m["test_acc"] == pytest.approx(float((pred == labels).mean()), abs=1e-12)
    assert len(m["history"]) == 2 and m["train_acc"] == m["history"][-1]["train_acc"]
    s = m["seconds"]
    parts = s["answers"] + s["data"] + s["precision"] + s["train"] + s["predict"]
    assert s["train"] > 0 and s["predict"] > 0 and parts <= s["total"] + 0.05, s


def test_cuda_oom_retries_once_at_half_the_batch(monkeypatch, capsys):
    calls = []

    def fake_train(data, hp, hw, cfg, epochs, batch_size, log=print, stats=None):
        calls.append((batch_size, cfg.resume))
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "model", [{"epoch": 1}]

    monkeypatch.setattr(hw2, "train", fake_train)
    cfg = argparse.Namespace(epochs=None, resume=True)
    hp = dict(hw2.PRESETS["full"])
    model, history, batch = hw2.train_with_oom_retry({}, hp, {}, cfg)
    assert calls == [(1024, True), (512, False)] and batch == 512 and model == "model"
    assert "retrying once at batch 512" in capsys.readouterr().out


def test_cuda_oom_twice_is_not_retried_again(monkeypatch):
    def always_oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(hw2, "train", always_oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        hw2.train_with_oom_retry({}, dict(hw2.PRESETS["full"]), {}, argparse.Namespace(epochs=None, resume=False))


def test_smoke_dry_run_slices_a_found_test_set_and_drops_its_sample(tmp_path, monkeypatch, tiny_cifar_dir, no_hw2_env):
    # On Kaggle the smoke preset finds the competition's test.npy (and its sample) by default:
    # it predicts a slice, so the full-length sample must not be applied to it.
    images = np.random.default_rng(4).integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    comp = tmp_path / "input" / hw2.COMPETITION
    comp.mkdir(parents=True)
    np.save(comp / "test.npy", images)
    pd.DataFrame({"Id": range(300), "Category": 0}).to_csv(comp / "sample_submission.csv", index=False)
    monkeypatch.setattr(hw2, "KAGGLE_ROOT", str(tmp_path))
    cfg = hw2.parse_config(["--preset", "smoke", "--data-dir", tiny_cifar_dir])
    data = hw2.load_data(cfg, hw2.PRESETS["smoke"])
    assert len(data["test_x"]) == hw2.PRESETS["smoke"]["n_test"] and data["sample"] is None
    assert np.array_equal(data["test_x"], images[:96].transpose(0, 3, 1, 2))
    assert len(hw2.make_submission(np.zeros(96, int), data["sample"])["ids"]) == 96

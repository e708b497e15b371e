"""Bad inputs end in one readable line, a non-zero exit, no traceback and no partial outputs.

Each bad input is checked twice:

* in-process (fast): the function that validates it (`hw2.find_data_dir`, `hw2.load_cifar_train`,
  `hw2.read_cifar_batch`, `hw2.read_test_npy`, ...) raises `hw2.HW2Error` naming the path;
* as a user runs it: `python hw2.py --preset smoke --output-dir OUT ...` exits non-zero with
  `hw2: error: <path>: <what is wrong>` on stderr, no "Traceback", and OUT (created by the run)
  removed again.

hw2.py validates the data only *after* Problems 1-3 (~12 s on 2 cores). The `core` cases, one per
kind of input, run the script as a user does, so the failure also has Problems 1-3's answers.json
to clean up; the others add `--skip-answers` (the same validation and error path, ~4 s instead of
~17 s each). Set HW2TESTS_CORE=1 to run only the `core` ones while iterating.
"""
import builtins
import os
import pickle
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pandas as pd
import pytest

import hw2
from conftest import run_hw2

FULL = os.environ.get("HW2TESTS_CORE", "") != "1"
OUTPUT_FILES = ("submission.csv", "answers.json", "metrics.json", "model.pt", "checkpoint.pt")
EPOCH_LINE = re.compile(r"^ *\d+ +-?\d+\.\d{4} +\d\.\d{4} +(-|\d\.\d{4}) +-?\d+\.\d{5} +\d+\.\d{2}$",
                        re.M)


# ------------------------------------------------------------------ helpers

pytestmark = pytest.mark.usefixtures("no_hw2_env")  # in-process calls read HW2_* variables


def copy_batches(tiny, dst):
    """A writable copy of the valid tiny cifar-10-batches-py folder."""
    shutil.copytree(tiny, dst)
    return str(dst)


def write_batch(path, obj, protocol=2):
    # protocol 2 is what the official CIFAR-10 files use
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def batch(n=200, row=3072, labels=None, dtype=np.uint8, seed=0):
    g = np.random.default_rng(seed)
    data = g.integers(0, 256, (n, row)).astype(dtype)
    labels = [int(v) for v in g.integers(0, 10, n)] if labels is None else labels
    return {b"batch_label": b"b", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}


def write_test_npy(path, n=50, seed=1):
    np.save(path, np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    return str(path)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "error:" in line]


def assert_clean_failure(res, out, path, phrase, out_existed=False):
    """The script contract for a bad input (see the module docstring)."""
    both = res.stdout + res.stderr
    assert res.returncode != 0, f"exit 0 on a bad input\n{both[-3000:]}"
    assert "Traceback" not in both, both[-3000:]
    errs = error_lines(res.stderr)
    assert len(errs) == 1, f"expected one error line on stderr, got {errs!r}\n{res.stderr[-3000:]}"
    msg = errs[0]
    assert msg.startswith("hw2: error: "), msg
    assert str(path) in msg, f"{path} not named in {msg!r}"
    assert re.search(phrase, msg), f"{phrase!r} not in {msg!r}"
    if out_existed:
        for name in OUTPUT_FILES:
            assert not os.path.exists(os.path.join(out, name)), f"partial output {name} left behind"
    else:
        assert not os.path.exists(out), f"{out} (created by the failed run) was not removed: " \
                                        f"{os.listdir(out) if os.path.isdir(out) else ''}"


def smoke(out, *args, env=None, cwd=None):
    return run_hw2("--preset", "smoke", "--output-dir", out, *args, env=env, cwd=cwd, timeout=400)


# ------------------------------------------------------------------ hostile pickles

class EvilSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class EvilEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.eval, (f"__import__('os').system('touch {self.marker}')",)


class EvilPopen:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return subprocess.Popen, (["touch", str(self.marker)],)


class EvilNumpyExec:
    """Only a numpy global, yet it runs code: being in numpy is not enough to be let through."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from numpy.testing._private.utils import runstring  # exec(astr, dict)
        return runstring, (f"open({self.marker!r}, 'w').close()", {})


HOSTILE = {
    "os_system": lambda m: EvilSystem(m),
    "builtins_eval": lambda m: EvilEval(m),
    "subprocess_popen": lambda m: EvilPopen(m),
    "numpy_exec": lambda m: EvilNumpyExec(m),
    # the payload hides inside an otherwise valid batch, after the image data
    "nested_in_valid_dict": lambda m: {**batch(), b"payload": EvilSystem(m)},
}


# ------------------------------------------------------------------ the cases

@dataclass
class Built:
    args: list                       # extra hw2.py arguments
    path: str                        # the offending path the message must name
    phrase: str                      # regex: what is wrong
    call: Optional[Callable] = None  # the in-process form (raises HW2Error)
    env: dict = field(default_factory=dict)
    marker: Optional[str] = None     # must never come into existence


def data_dir_case(make, phrase, bad_file=None, call="file"):
    """`make(folder)` damages a copy of the tiny batches; the run must name `bad_file` (or the dir)."""
    def build(tmp, tiny):
        d = copy_batches(tiny, tmp / "cifar")
        make(d)
        path = os.path.join(d, bad_file) if bad_file else d
        if call == "file":
            fn = lambda: hw2.read_cifar_batch(path)
        else:
            fn = lambda: hw2.load_cifar_train(hw2.find_data_dir(d)[0])
        return Built(["--data-dir", d], path, phrase, fn)
    return build


def dir_case(make, phrase):
    def build(tmp, tiny):
        d = str(tmp / "datadir")
        make(d, tiny)
        return Built(["--data-dir", d], d, phrase, lambda: hw2.find_data_dir(d))
    return build


def hostile_case(variant):
    def build(tmp, tiny):
        d = copy_batches(tiny, tmp / "cifar")
        marker = str(tmp / f"PWNED-{variant}")
        path = os.path.join(d, "data_batch_1")
        write_batch(path, HOSTILE[variant](marker))
        return Built(["--data-dir", d], path, r"not a CIFAR-10 batch \(refusing to load",
                     lambda: hw2.read_cifar_batch(path), marker=marker)
    return build


def npy_case(make, phrase):
    """`make(path)` writes a bad test.npy at `path`."""
    def build(tmp, tiny):
        p = str(tmp / "test.npy")
        make(p)
        return Built(["--test-npy", p, "--data-dir", tiny], p, phrase, lambda: hw2.read_test_npy(p))
    return build


def _truncate(d, name="data_batch_3"):
    p = os.path.join(d, name)
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[:len(raw) // 2])


def _png_bytes(p):
    open(p, "wb").write(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)


def _npy_truncated(p):
    write_test_npy(p)
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[:len(raw) // 2])


def sample_case(make, phrase):
    """`make(path)` writes a bad sample_submission.csv beside a valid 50-image test.npy."""
    def build(tmp, tiny):
        t = write_test_npy(tmp / "test.npy", n=50)
        s = str(tmp / "sample_submission.csv")
        make(s)
        return Built(["--test-npy", t, "--data-dir", tiny], s, phrase, lambda: hw2.read_sample_submission(t, 50))
    return build


@dataclass
class Case:
    id: str
    build: Callable
    core: bool = False  # run the subprocess form with Problems 1-3 first, as a user does


CASES = [
    # --- --data-dir
    Case("data_dir_missing", dir_case(lambda d, t: None, "no such directory")),
    Case("data_dir_is_a_file", dir_case(lambda d, t: open(d, "w").write("x"), "is a file, not a directory")),
    Case("data_dir_empty", dir_case(lambda d, t: os.mkdir(d), "no CIFAR-10 batch files")),
    Case("data_dir_without_batches", dir_case(
        lambda d, t: (os.mkdir(d), open(os.path.join(d, "readme.txt"), "w").write("hi"),
                      os.mkdir(os.path.join(d, "cifar-10-batches-py"))), "no CIFAR-10 batch files")),
    Case("batch_truncated", data_dir_case(_truncate, r"truncated", "data_batch_3"), core=True),
    Case("batch_random_bytes", data_dir_case(
        lambda d: open(os.path.join(d, "data_batch_3"), "wb").write(
            np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8).tobytes()),
        r"not a CIFAR-10 batch|corrupted", "data_batch_3")),
    Case("batch_legacy_torch_save", data_dir_case(  # pickle's own message spans two lines
        lambda d: open(os.path.join(d, "data_batch_2"), "wb").write(b"\x80\x02X\x01\x00\x00\x00xQ."),
        r"not a CIFAR-10 batch \(A load persistent id instruction was encountered, but no", "data_batch_2")),
    Case("batch_holds_list", data_dir_case(
        lambda d: write_batch(os.path.join(d, "data_batch_2"), [1, 2, 3]),
        r"holds a list, not a dict", "data_batch_2")),
    Case("batch_float_data", data_dir_case(
        lambda d: write_batch(os.path.join(d, "data_batch_2"), batch(dtype=np.float32)),
        r"'data' must be a uint8 numpy array", "data_batch_2")),
    Case("batch_label_10", data_dir_case(
        lambda d: write_batch(os.path.join(d, "data_batch_4"), batch(labels=[10] + [0] * 199)),
        r"labels out of range 0\.\.9", "data_batch_4")),
    Case("batch_label_minus_1", data_dir_case(
        lambda d: write_batch(os.path.join(d, "data_batch_4"), batch(labels=[-1] + [0] * 199)),
        r"labels out of range 0\.\.9", "data_batch_4")),
    Case("batch_label_2_pow_70", data_dir_case(  # past int64: numpy's conversion used to overflow
        lambda d: write_batch(os.path.join(d, "data_batch_4"), batch(labels=[2**70] + [0] * 199)),
        r"labels out of range 0\.\.9 \(found 0\.\.1180591620717411303424\)", "data_batch_4")),
    Case("batch_label_10_pow_5000", data_dir_case(  # past what str() of an int may print
        lambda d: write_batch(os.path.join(d, "data_batch_4"), batch(labels=[10**5000] + [0] * 199)),
        r"labels out of range 0\.\.9 \(found a label of over 100 digits\)", "data_batch_4")),
    Case("batch_199_images_200_labels", data_dir_case(
        lambda d: write_batch(os.path.join(d, "data_batch_1"), batch(n=199, labels=[0] * 200)),
        r"199 images but 200 labels", "data_batch_1")),
    Case("batch_rows_of_3000_bytes", data_dir_case(
        lambda d: write_batch(os.path.join(d, "data_batch_1"), batch(row=3000)),
        r"has shape \(200, 3000\)", "data_batch_1")),
    Case("batch_5_missing", data_dir_case(
        lambda d: os.remove(os.path.join(d, "data_batch_5")), r"missing", "data_batch_5",
        call="folder")),
    # --- hostile pickles: refused, and no code runs
    Case("hostile_os_system", hostile_case("os_system"), core=True),
    Case("hostile_builtins_eval", hostile_case("builtins_eval")),
    Case("hostile_numpy_exec", hostile_case("numpy_exec")),
    Case("hostile_subprocess_popen", hostile_case("subprocess_popen")),
    Case("hostile_nested_in_valid_dict", hostile_case("nested_in_valid_dict")),
    # --- --test-npy
    Case("npy_missing", npy_case(lambda p: None, "no such file")),
    Case("npy_is_a_directory", npy_case(lambda p: os.mkdir(p), r"is a directory, not a \.npy file")),
    Case("npy_text_file", npy_case(lambda p: open(p, "w").write("1,2,3\n4,5,6\n"), r"not a \.npy file")),
    Case("npy_png_bytes", npy_case(_png_bytes, r"not a \.npy file")),
    Case("npy_object_array", npy_case(
        lambda p: np.save(p, np.array([{"a": 1}, "x", None], dtype=object), allow_pickle=True),
        "holds Python objects"), core=True),
    Case("npy_truncated", npy_case(_npy_truncated, r"unreadable|corrupted|truncated")),
    Case("npy_rank_3", npy_case(lambda p: np.save(p, np.zeros((10, 32, 32), np.uint8)),
                                r"shape \(10, 32, 32\)")),
    Case("npy_28x28", npy_case(lambda p: np.save(p, np.zeros((10, 28, 28, 3), np.uint8)),
                               r"shape \(10, 28, 28, 3\)")),
    Case("npy_zero_images", npy_case(lambda p: np.save(p, np.zeros((0, 32, 32, 3), np.uint8)),
                                     "zero images")),
    Case("npy_nan", npy_case(lambda p: np.save(p, np.where(np.arange(10 * 3072).reshape(10, 32, 32, 3) == 5,
                                                           np.nan, 0.5).astype(np.float32)), "NaN or inf")),
    Case("npy_inf", npy_case(lambda p: np.save(p, np.full((10, 3, 32, 32), np.inf, np.float64)),
                             "NaN or inf")),
    Case("npy_float_0_255", npy_case(lambda p: np.save(p, np.linspace(0, 255, 10 * 3072, dtype=np.float32)
                                                       .reshape(10, 32, 32, 3)),
                                     r"float values outside \[0, 1\]")),
    Case("npy_int16_300", npy_case(lambda p: np.save(p, np.full((10, 32, 32, 3), 300, np.int16)),
                                   r"integer values outside 0\.\.255")),
    Case("npy_bool", npy_case(lambda p: np.save(p, np.zeros((10, 32, 32, 3), bool)), "not numeric")),
    # --- sample_submission.csv beside test.npy
    Case("sample_row_count_mismatch", sample_case(
        lambda s: pd.DataFrame({"id": range(49), "label": 0}).to_csv(s, index=False),
        "49 rows but the test set has 50 images"), core=True),
    Case("sample_one_column", sample_case(
        lambda s: pd.DataFrame({"id": range(50)}).to_csv(s, index=False), "expected an id column and a label column")),
    Case("sample_empty_file", sample_case(lambda s: open(s, "w").close(), "expected an id column and a label column")),
    Case("sample_binary_bytes", sample_case(lambda s: open(s, "wb").write(b"\xff\xfe\x00\x81" * 64), "unreadable CSV")),
    Case("sample_short_row", sample_case(
        lambda s: open(s, "w").write("id,label\n" + "".join(f"{i},0\n" for i in range(49)) + "49\n"),
        "line 51 has one field")),
    Case("sample_unclosed_quote", sample_case(  # strict CSV: not one huge field, then a row count
        lambda s: open(s, "w").write("id,label\n" + "".join(f"{i},0\n" for i in range(20)) + '"20,0\n'
                                     + "".join(f"{i},0\n" for i in range(21, 50))),
        "line 22: a quote opened there is never closed")),
    Case("sample_nul_in_id", sample_case(  # ids are copied into submission.csv
        lambda s: open(s, "w").write("id,label\n" + "".join(f"{i},0\n" for i in range(49)) + "49\x00,0\n"),
        "line 51: its id holds a control character")),
    Case("sample_duplicate_ids", sample_case(
        lambda s: pd.DataFrame({"id": [0] * 50, "label": 0}).to_csv(s, index=False), "ids are not unique")),
]


def _case_params():
    return [pytest.param(c, id=c.id) for c in CASES]


# ------------------------------------------------------------------ in-process form

@pytest.mark.parametrize("case", _case_params())
def test_in_process_raises_hw2error(case, tmp_path, tiny_cifar_dir):
    b = case.build(tmp_path, tiny_cifar_dir)
    with pytest.raises(hw2.HW2Error) as err:
        b.call()
    msg = str(err.value)
    assert b.path in msg, msg
    assert re.search(b.phrase, msg), msg
    assert "\n" not in msg
    if b.marker:
        assert not os.path.exists(b.marker), "the hostile pickle ran code"


@pytest.mark.parametrize("variant", ["os_system", "builtins_eval", "subprocess_popen", "numpy_exec"])
def test_hostile_fixture_really_runs_code_under_plain_pickle(variant, tmp_path):
    """Control: the payloads above do execute with an unrestricted pickle.load."""
    marker = tmp_path / "PWNED"
    obj = pickle.loads(pickle.dumps(HOSTILE[variant](str(marker)), protocol=2))
    if isinstance(obj, subprocess.Popen):
        obj.wait()
    assert marker.exists()


def test_real_cifar_protocol_2_batch_is_accepted(tmp_path):
    """Control for the batch cases: the same writer with good content passes."""
    p = str(tmp_path / "data_batch_1")
    write_batch(p, batch(n=7, labels=[0, 1, 2, 3, 4, 5, 9]))
    x, y = hw2.read_cifar_batch(p)
    assert x.shape == (7, 3, 32, 32) and x.dtype == np.uint8
    assert y.tolist() == [0, 1, 2, 3, 4, 5, 9] and y.dtype == np.int64


def test_a_batch_with_empty_bytes_pickled_by_python_3_at_protocol_2_is_accepted(tmp_path):
    # Python 3 writes b"" at protocol 2 as a call to bytes() (other bytes via _codecs.encode)
    p = str(tmp_path / "data_batch_1")
    write_batch(p, {**batch(n=3, labels=[1, 2, 3]), b"batch_label": b"", b"filenames": [b"", b"a.png", b""]})
    x, y = hw2.read_cifar_batch(p)
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [1, 2, 3]


def test_bytes_called_with_a_size_is_refused(tmp_path):
    # the allowance is for bytes() only: bytes(10**12) would be an allocation the file chooses
    p = tmp_path / "data_batch_1"
    p.write_bytes(b"\x80\x02c__builtin__\nbytes\nJ\x00\x10\x00\x00\x85R.")  # bytes(4096)
    with pytest.raises(hw2.HW2Error, match=r"data_batch_1: not a CIFAR-10 batch \(refusing to load bytes\(\) with arguments\)"):
        hw2.read_cifar_batch(str(p))


def test_labels_saved_as_numpy_integers_are_accepted(tmp_path):
    # a batch written from numpy (a list of np.int64): a numpy scalar is a dtype and its bytes
    p = str(tmp_path / "data_batch_1")
    write_batch(p, batch(n=3, labels=[np.int64(k) for k in (7, 0, 9)]))
    assert hw2.read_cifar_batch(p)[1].tolist() == [7, 0, 9]


def test_a_path_with_a_line_break_is_still_one_line(tmp_path):
    missing = str(tmp_path / "no\nsuch")
    res = smoke(tmp_path / "out", "--data-dir", missing, "--skip-answers")
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    shown = missing.replace("\n", "\\n")  # the break shown as \n, as Python writes it
    assert res.stderr.splitlines() == [f"hw2: error: --data-dir {shown}: no such directory"]


def test_valid_batch_pickled_with_protocol_5_is_accepted(tmp_path):
    p = str(tmp_path / "data_batch_1")
    write_batch(p, batch(n=7), protocol=5)
    x, _ = hw2.read_cifar_batch(p)
    assert x.shape == (7, 3, 32, 32)


def test_good_test_npy_forms_are_accepted(tmp_path):
    """Controls for the npy cases: uint8 NHWC, uint8 NCHW and float [0,1] pass, as uint8 NCHW."""
    g = np.random.default_rng(0)
    u8 = g.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    for name, arr in [("nhwc", u8), ("nchw", u8.transpose(0, 3, 1, 2)), ("float", u8 / 255.0),
                      ("int16", u8.astype(np.int16))]:
        p = str(tmp_path / f"{name}.npy")
        np.save(p, arr)
        out = hw2.read_test_npy(p)
        assert out.dtype == np.uint8 and out.shape == (4, 3, 32, 32), name
        np.testing.assert_array_equal(out, u8.transpose(0, 3, 1, 2), err_msg=name)


# ------------------------------------------------------------------ as a user runs it

@pytest.mark.parametrize("case", _case_params())
def test_script_rejects_bad_input(case, tmp_path, tiny_cifar_dir):
    if not (case.core or FULL):
        pytest.skip("the in-process test covers this input; HW2TESTS_CORE=1 skipped its script form")
    b = case.build(tmp_path, tiny_cifar_dir)
    out = tmp_path / "out"
    res = smoke(out, *b.args, *([] if case.core else ["--skip-answers"]), env=b.env)
    assert_clean_failure(res, out, b.path, b.phrase)
    assert "train_loss" not in res.stdout
    assert ("Problem 3" in res.stdout) == case.core, res.stdout[-2000:]  # the answers ran (core) or not
    if b.marker:
        assert not os.path.exists(b.marker), "the hostile pickle ran code"


def test_explicit_data_dir_is_never_replaced_by_cwd_data(tmp_path, tiny_cifar_dir):
    cwd = tmp_path / "cwd"
    (cwd / "data").mkdir(parents=True)
    copy_batches(tiny_cifar_dir, cwd / "data" / "cifar-10-batches-py")  # a valid ./data
    bad = cwd / "empty"
    bad.mkdir()
    out = tmp_path / "out"
    res = smoke(out, "--data-dir", bad, cwd=cwd)
    assert_clean_failure(res, out, bad, "no CIFAR-10 batch files")
    assert "from ./data" not in res.stdout


@pytest.mark.parametrize("args,named,phrase", [
    (["--data-dir", "{t}/nope"], "{t}/nope", "no such directory"),
    (["--data-dir", "{t}"], "{t}", "no CIFAR-10 batch files"),
    (["--test-npy", "{t}/nope.npy"], "{t}/nope.npy", "no such file"),
    (["--resume"], "{t}/out/checkpoint.pt", "does not exist"),
    (["--predict-only"], "{t}/out/model.pt", "does not exist"),
], ids=["data_dir_missing", "data_dir_empty", "test_npy_missing", "resume", "predict_only"])
def test_bad_paths_fail_before_the_answers(args, named, phrase, tmp_path):
    # a typo must not cost the ~9 s of Problems 1-3 first: nothing of Problem 1 is printed
    out = tmp_path / "out"
    res = smoke(out, *[a.format(t=tmp_path) for a in args])
    assert_clean_failure(res, out, named.format(t=tmp_path), phrase)
    assert "Problem 1" not in res.stdout, res.stdout[-2000:]


def test_env_var_data_dir_gives_the_same_error_as_the_flag(tmp_path):
    bad = str(tmp_path / "nope")
    flag = smoke(tmp_path / "out1", "--data-dir", bad)
    env = smoke(tmp_path / "out2", env={"HW2_DATA_DIR": bad})
    assert_clean_failure(flag, tmp_path / "out1", bad, "no such directory")
    assert_clean_failure(env, tmp_path / "out2", bad, "no such directory")
    assert error_lines(env.stderr) == error_lines(flag.stderr)
    assert env.returncode == flag.returncode


# --- failures before any work: output dir and flag values (fast: before Problems 1-3)

def test_output_dir_under_a_regular_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out = afile / "out"
    res = smoke(out)
    assert_clean_failure(res, out, out, "cannot be created or written")
    assert afile.read_text() == "keep me"
    assert "train_loss" not in res.stdout and "Problem 1" not in res.stdout


def test_output_dir_is_a_regular_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    res = smoke(afile)
    assert res.returncode != 0 and "Traceback" not in res.stdout + res.stderr
    assert error_lines(res.stderr) == [f"hw2: error: --output-dir {afile}: exists and is not a directory"]
    assert afile.read_text() == "keep me"
    assert "train_loss" not in res.stdout


def test_output_dir_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    # root (as in CI) ignores the mode, but not the immutable attribute (ext4 and most others)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode == 0
    try:
        if os.access(ro, os.W_OK) and not immutable:
            pytest.skip("running as root where chattr +i is unavailable: a 0o500 dir is still "
                        "writable (the under-a-file case covers an unusable --output-dir)")
        res = smoke(ro)
        assert_clean_failure(res, ro, ro, "cannot be created or written", out_existed=True)
        assert os.listdir(ro) == []
        assert "train_loss" not in res.stdout
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
        ro.chmod(0o700)


@pytest.mark.parametrize("args,env,phrase", [
    (["--epochs", "0"], {}, r"--epochs 0: must be at least 1"),
    (["--val-size", "-1"], {}, r"--val-size -1: must be 0 or more"),
    (["--resume", "--predict-only"], {}, r"exclude each other"),
    (["--answers-only"], {"HW2_SKIP_ANSWERS": "1"}, r"--answers-only and --skip-answers exclude each other"),
    (["--deterministic", "--autotune", "on"], {}, r"--deterministic and --autotune on exclude each other"),
    ([], {"HW2_ANSWERS_ONLY": "maybe"}, r"HW2_ANSWERS_ONLY='maybe': expected 1/0"),
    ([], {"HW2_EPOCHS": "abc"}, r"HW2_EPOCHS='abc': expected an integer"),
    (["--widths", "128,384"], {}, r"--widths 128,384: expected three whole numbers from 1 to 4096"),
    ([], {"HW2_WIDTHS": "0,8,8"}, r"--widths 0,8,8: expected three whole numbers from 1 to 4096"),
    (["--widths", "8,8,99999999999999999999"], {}, r"--widths 8,8,9+: expected three whole numbers from 1 to 4096"),
    (["--widths", "8,8,\u00b2"], {}, r"--widths 8,8,\u00b2: expected three whole numbers"),
    (["--widths", "8,8," + "9" * 5000], {}, r"--widths 8,8,9+: expected three whole numbers"),
    (["--gpus", "9" * 5000], {}, r"--gpus 9+: expected auto or a whole number"),
    (["--seed", "99999999999999999999"], {}, r"--seed 9+: expected a whole number from 0 to 4294967295"),
    ([], {"HW2_SEED": "-2"}, r"--seed -2: expected a whole number from 0 to 4294967295"),
    (["--gpus", "\u00b2"], {}, r"--gpus \u00b2: expected auto or a whole number"),
    (["--output-dir", ""], {}, r"--output-dir '': empty; leave the flag out for the default"),
    # argparse's own refusals: one line too (not usage + exit 2), with where to look
    (["--epochs", "abc"], {}, r"^hw2: error: argument --epochs: invalid int value: 'abc' \(python hw2\.py --help"),
    (["--checkpoint-evry", "5"], {}, r"^hw2: error: unrecognized arguments: --checkpoint-evry 5 \(python hw2\.py --help"),
], ids=["epochs_0", "val_size_-1", "resume_and_predict_only", "answers_only_and_skip_answers", "deterministic_and_autotune",
        "HW2_ANSWERS_ONLY_maybe", "HW2_EPOCHS_abc",
        "widths_two", "HW2_WIDTHS_zero", "widths_past_int64", "widths_superscript_digit", "widths_5000_digits", "gpus_5000_digits", "seed_past_int64",
        "HW2_SEED_negative", "gpus_superscript_digit", "output_dir_empty", "epochs_abc", "misspelt_flag"])
def test_bad_flag_values(args, env, phrase, tmp_path):
    out = tmp_path / "out"
    res = smoke(out, *args, env=env)
    both = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in both, both[-3000:]
    errs = error_lines(res.stderr)
    assert len(errs) == 1 and re.search(phrase, errs[0]), res.stderr
    assert not out.exists()
    assert "Problem 1" not in res.stdout  # rejected before any work


def test_seed_range_is_inclusive_at_both_ends():
    """--seed takes 0..2^32-1, both ends, as its message says (a `<` for `<=` refused
    4294967295), and the run's generators accept either end; one past either end is refused."""
    for seed in (0, hw2.MAX_SEED):
        assert hw2.parse_config(["--seed", str(seed)]).seed == seed
        hw2.torch.Generator().manual_seed(seed)
        np.random.default_rng(seed)
    for bad in (-1, hw2.MAX_SEED + 1):
        with pytest.raises(hw2.HW2Error, match=rf"--seed {bad}: expected a whole number from 0 to 4294967295"):
            hw2.parse_config(["--seed", str(bad)])


@pytest.mark.parametrize("env,shown", [({}, "''"), ({"RANK": "abc"}, "'abc'"), ({"RANK": "0", "WORLD_SIZE": "x"}, "'x'")],
                         ids=["no_rank", "rank_abc", "world_size_x"])
def test_garbled_torchrun_variables_are_one_line(tmp_path, env, shown):
    # torchrun sets these; a hand-set TORCHELASTIC_RUN_ID without them used to end in a KeyError
    # at import, before hw2's error hook exists
    out = tmp_path / "out"
    res = smoke(out, "--skip-answers", "--device", "cpu", env={"TORCHELASTIC_RUN_ID": "x", **env})
    both = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in both, both[-3000:]
    name = "WORLD_SIZE" if "WORLD_SIZE" in env else "RANK"
    assert error_lines(res.stderr) == [f"hw2: error: torchrun's {name}={shown}: expected a whole number"]


def test_bad_env_int_names_the_variable(tmp_path):
    res = smoke(tmp_path / "out", env={"HW2_EPOCHS": "abc"})
    assert res.returncode != 0
    assert "HW2_EPOCHS" in res.stderr
    assert not res.stderr.lstrip().startswith("usage:")


@pytest.mark.parametrize("name", ["preset", "device", "precision", "autotune", "cuda_graph"])
def test_bad_env_choice_is_rejected(name, monkeypatch):
    monkeypatch.setenv(f"HW2_{name.upper()}", "bogus")
    with pytest.raises(hw2.HW2Error, match="bogus"):
        hw2.parse_config([])


def test_empty_env_data_dir_means_unset(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no ./data here
    monkeypatch.setenv("HW2_DATA_DIR", "")
    monkeypatch.setenv("HW2_PRESET", "smoke")
    cfg = hw2.parse_config([])
    data = hw2.load_data(cfg, hw2.PRESETS["smoke"])  # smoke without data: synthetic images
    assert data["source"] == "synthetic"


# ------------------------------------------------------------------ sample_submission.csv

def _sample(tmp_path, **columns):
    """A sample_submission.csv as Kaggle would give one (written by pandas), read by hw2."""
    p = tmp_path / "sample_submission.csv"
    pd.DataFrame(columns).to_csv(p, index=False)
    return hw2.read_sample_csv(str(p))


def test_make_submission_follows_sample_ids_and_columns(tmp_path):
    sub = hw2.make_submission(np.array([5, 6, 7]), _sample(tmp_path, id=[2, 0, 1], label=[0, 0, 0]))
    assert sub["columns"] == ["id", "label"]
    assert sub["ids"] == ["2", "0", "1"]  # as the sample writes them
    assert sub["labels"] == [7, 5, 6]  # id k gets image k's prediction


def test_make_submission_non_index_ids_keep_row_order(tmp_path):
    sub = hw2.make_submission(np.array([5, 6, 7]), _sample(tmp_path, ImageId=["c", "a", "b"], Label=[0, 0, 0]))
    assert sub["ids"] == ["c", "a", "b"] and sub["labels"] == [5, 6, 7]


def test_make_submission_integer_ids_that_are_no_index_keep_row_order(tmp_path):
    # ids 10, 11, 12 for 3 images: not a permutation of 0..2, so row i is image i
    sub = hw2.make_submission(np.array([5, 6, 7]), _sample(tmp_path, id=[12, 10, 11], label=[0, 0, 0]))
    assert sub["ids"] == ["12", "10", "11"] and sub["labels"] == [5, 6, 7]


def test_make_submission_keeps_two_columns_and_numeric_labels(tmp_path):
    # a sample with a third column and labels written as 0.0: the submission has the sample's
    # first two column names and numeric labels (0.0 is a number, not a class name)
    sample = _sample(tmp_path, id=[0, 1], label=[0.0, 0.0], usage=["Public", "Private"])
    assert sample["labels"] == ["0.0", "0.0"]
    hw2.write_submission(str(tmp_path / "submission.csv"), hw2.make_submission(np.array([3, 9]), sample))
    assert (tmp_path / "submission.csv").read_text() == "id,label\n0,3\n1,9\n"


def test_make_submission_name_labels_become_class_names(tmp_path):
    sub = hw2.make_submission(np.array([0, 9]), _sample(tmp_path, id=[0, 1], label=["cat", "cat"]))
    assert sub["labels"] == ["airplane", "truck"]


def test_sample_files_are_read_as_pandas_read_them(tmp_path):
    """What the earlier reader (pandas.read_csv) accepted without fuss: a UTF-8 BOM, Windows line
    ends, a blank and a whitespace-only line, and labels left empty (numbers to fill in, not
    class names)."""
    p = tmp_path / "sample_submission.csv"
    p.write_bytes(b"\xef\xbb\xbfId,Category\r\n2,\r\n\r\n0,\r\n   \r\n1,\r\n")
    old = pd.read_csv(p)
    sample = hw2.read_sample_csv(str(p))
    assert sample["columns"] == list(old.columns) == ["Id", "Category"]
    assert [int(i) for i in sample["ids"]] == old["Id"].tolist() == [2, 0, 1]
    sub = hw2.make_submission(np.array([5, 6, 7]), sample)
    assert pd.api.types.is_numeric_dtype(old["Category"]) and sub["labels"] == [7, 5, 6]
    for ids in (["²", "0", "1"], ["٢", "0", "1"]):  # digits, but no image index: rows keep their order
        sub = hw2.make_submission(np.array([5, 6, 7]), dict(sample, ids=ids))
        assert sub["labels"] == [5, 6, 7]


def test_submission_file_round_trips_through_pandas(tmp_path):
    """What write_submission writes is what pandas (Kaggle's reader) reads: the sample's header,
    its ids as written (quoted where they hold a comma), one label per image."""
    sample = _sample(tmp_path, **{"image id": ["b,1", "a", "007"], "label": ["cat", "dog", "cat"]})
    hw2.write_submission(str(tmp_path / "submission.csv"), hw2.make_submission(np.array([1, 2, 3]), sample))
    back = pd.read_csv(tmp_path / "submission.csv", dtype=str)
    assert list(back.columns) == ["image id", "label"]
    assert back["image id"].tolist() == ["b,1", "a", "007"] and back["label"].tolist() == ["automobile", "bird", "cat"]


def test_default_submission_bytes_are_those_pandas_wrote(tmp_path):
    """The no-sample submission, byte for byte what the earlier pandas writer gave
    (DataFrame.to_csv(index=False)): the sha256 recorded in earlier runs stays comparable."""
    preds = np.random.default_rng(0).integers(0, 10, 1000)
    hw2.write_submission(str(tmp_path / "submission.csv"), hw2.make_submission(preds))
    want = pd.DataFrame({"Id": np.arange(1000), "Category": preds.astype(int)}).to_csv(index=False)
    assert (tmp_path / "submission.csv").read_bytes() == want.encode()


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, tiny_cifar_dir):
    """One smoke run whose test.npy has a sample_submission.csv (id,label; shuffled ids; names)."""
    d = tmp_path_factory.mktemp("sample")
    t = write_test_npy(d / "test.npy", n=50)
    ids = np.random.default_rng(3).permutation(50)
    sample = pd.DataFrame({"id": ids, "label": "cat"})
    sample.to_csv(d / "sample_submission.csv", index=False)
    out = d / "out"
    res = smoke(out, "--data-dir", tiny_cifar_dir, "--test-npy", t)
    return res, out, sample


def test_sample_submission_positive_control(sample_run):
    res, out, sample = sample_run
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "Traceback" not in res.stdout + res.stderr
    sub = pd.read_csv(out / "submission.csv")
    assert list(sub.columns) == ["id", "label"]
    assert len(sub) == 50
    assert sub["id"].tolist() == sample["id"].tolist()
    for name in OUTPUT_FILES:
        assert (out / name).is_file(), name


def test_sample_submission_string_labels_are_copied(sample_run):
    res, out, _ = sample_run
    assert res.returncode == 0
    sub = pd.read_csv(out / "submission.csv")
    assert sub["label"].isin(hw2.CIFAR_CLASSES).all(), sub["label"].head().tolist()

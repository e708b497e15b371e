"""Clean ends: a failed write is one line naming the file and the system's reason, with no temp
file left; a notebook shows an HW2Error as one line and cleans up; unknown HW2_* variables warn."""
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

import hw2
from conftest import ROOT, run_hw2


pytestmark = pytest.mark.usefixtures("no_hw2_env")


# ------------------------------------------------------------------ writes

def _full_disk_after(n_bytes):
    def write_fn(f):
        f.write(b"x" * n_bytes)
        f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write_fn


def test_atomic_write_stages_beside_the_target_and_never_shows_half_a_file(tmp_path):
    """While the writer runs, the target keeps its old bytes and the new ones go to a hidden file in
    the same folder (same filesystem, so os.replace is atomic); afterwards only the target is left."""
    target = tmp_path / "submission.csv"
    target.write_text("old\n")
    seen = {}

    def write(f):
        f.write("new,")
        f.flush()
        seen["target"] = target.read_text()
        seen["others"] = sorted(p for p in os.listdir(tmp_path) if p != "submission.csv")
        f.write("done\n")

    hw2.atomic_write(str(target), write)
    assert seen["target"] == "old\n"
    assert len(seen["others"]) == 1 and seen["others"][0].startswith(".submission.csv.")
    assert target.read_text() == "new,done\n" and os.listdir(tmp_path) == ["submission.csv"]


def test_full_disk_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("previous run")
    with pytest.raises(hw2.HW2Error) as err:
        hw2.atomic_write(str(path), _full_disk_after(100), mode="wb")
    assert str(err.value).startswith(f"{path}: cannot write (No space left on device)")
    assert err.value.__cause__ is None and err.value.__suppress_context__  # one line, no chain
    assert os.listdir(tmp_path) == ["metrics.json"] and path.read_text() == "previous run"


def test_torch_save_on_a_full_disk(tmp_path, monkeypatch):
    # torch.save writes through the file object; its ENOSPC must come out as the same one line
    import torch
    path = tmp_path / "checkpoint.pt"
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(hw2.HW2Error, match=f"{path}: cannot write \\(No space left on device\\)"):
        hw2.save_torch(str(path), {"w": torch.zeros(10000)})
    assert os.listdir(tmp_path) == []


def test_json_outputs_are_strict_json_even_with_a_nan_loss(tmp_path):
    # an fp16 epoch whose overflowing step was skipped may record an inf or NaN loss: metrics.json
    # writes null there (json.dumps would write NaN, which strict JSON readers refuse)
    path = tmp_path / "metrics.json"
    hw2.write_json(str(path), dict(history=[dict(train_loss=float("nan"), lr=0.1)], seconds=(1.5, float("inf"))))
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON")) == \
        dict(history=[dict(train_loss=None, lr=0.1)], seconds=[1.5, None])


def test_output_dir_deleted_mid_run(tmp_path):
    gone = tmp_path / "gone"
    with pytest.raises(hw2.HW2Error, match=f"{gone / 'model.pt'}: cannot write \\(No such file or directory\\)"):
        hw2.atomic_write(str(gone / "model.pt"), lambda f: f.write("x"))


def test_output_piped_to_a_reader_that_closes_ends_in_one_line(tmp_path):
    # `python hw2.py | head -1`: the next print raises BrokenPipeError; one line on stderr, no
    # traceback, and no "Exception ignored" from Python's own flush at exit
    env = {k: v for k, v in os.environ.items() if not k.startswith("HW2_")}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "hw2.py"), "--answers-only",
                             "--output-dir", str(tmp_path / "out")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stdout.readline().startswith("hw2 | python")
    proc.stdout.close()  # as head does after its first line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert err.splitlines() == ["hw2: error: the output was piped to a program that closed it (e.g. "
                                "`| head`), so the run stopped; a checkpoint (if any) is in the "
                                "output dir: rerun with --resume"], err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_output_sent_to_a_full_device_ends_in_one_line(tmp_path):
    # `python hw2.py > /dev/full` (or stdout on a full disk): the first print fails with ENOSPC;
    # one line on stderr naming stdout and the reason, no traceback, no output dir left behind
    env = {k: v for k, v in os.environ.items() if not k.startswith("HW2_")}
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "hw2.py"), "--answers-only",
                               "--output-dir", str(tmp_path / "out")], stdout=full,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["hw2: error: cannot write the log to stdout (No space left on "
                                        "device): free some space or send it elsewhere; a checkpoint "
                                        "(if any) is in the output dir: rerun with --resume"], proc.stderr
    assert not (tmp_path / "out").exists()


def test_permission_lost(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    if os.geteuid() == 0:  # root (as in CI) ignores the mode: the kernel's refusal, by hand
        def refused(dir=None, **kw):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dir))
        monkeypatch.setattr(hw2.tempfile, "mkstemp", refused)
    try:
        with pytest.raises(hw2.HW2Error, match="Permission denied"):
            hw2.atomic_write(str(d / "x.json"), lambda f: f.write("x"))
    finally:
        d.chmod(0o700)


def test_a_real_write_limit_ends_the_script_in_one_line(tmp_path, tiny_cifar_dir):
    # A real kernel refusal, no mocks: RLIMIT_FSIZE makes every write past 50 kB fail with EFBIG
    # (Python ignores SIGXFSZ). Problems 1-3 write nothing; checkpoint.pt (>= 84 kB for smoke,
    # even weights only) is the first file that does not fit.
    out = tmp_path / "out"
    test_npy = tmp_path / "test.npy"
    np.save(test_npy, np.zeros((20, 32, 32, 3), np.uint8))
    limit = 50_000
    env = {k: v for k, v in os.environ.items() if not k.startswith("HW2_")}
    env.update(PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "hw2.py"), "--preset", "smoke", "--data-dir",
                          tiny_cifar_dir, "--test-npy", str(test_npy), "--output-dir", str(out)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path),
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errs = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert errs == [f"hw2: error: {out / 'checkpoint.pt'}: cannot write (File too large); files "
                    "written before it are complete, e.g. checkpoint.pt for --resume"], res.stderr[-3000:]
    assert not out.exists()  # the run created it and completed nothing in it: removed, temp file too


ONE_LINE = "hw2: interrupted; a checkpoint (if any) is in the output dir: rerun with --resume"


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    # torch takes 1-2 s to import: a Ctrl-C then used to print a KeyboardInterrupt traceback. A
    # stand-in torch package sends the process a real SIGINT from inside its import.
    fake = tmp_path / "stand_in" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\n"
                                      "time.sleep(30)\n")
    res = run_hw2("--output-dir", tmp_path / "out", env={"PYTHONPATH": str(tmp_path / "stand_in")},
                  timeout=60, cwd=tmp_path)
    assert res.returncode != 0 and res.stdout == ""
    assert res.stderr.splitlines() == [ONE_LINE], res.stderr[-3000:]


_PREWARM_THEN_CTRL_C = """
import os, sys, time
import hw2
sys.excepthook = hw2._script_excepthook  # what `python hw2.py` installs
def slow_start():  # a CUDA start that takes a while
    time.sleep({sleep})
    open({marker!r}, "w").close()
hw2.prewarm_cuda = slow_start
hw2.Prewarm().start()
print("started", flush=True)
time.sleep(60)  # the data load, interrupted here
"""

def _run_child(tmp_path, name, code, interrupt):
    """Run `code` with hw2 importable; once it prints "started", `interrupt(proc)`. Returns
    (exit code, stderr, seconds from the first signal to the end). The child is killed if the
    test fails on the way: none is left behind."""
    script = tmp_path / f"{name}.py"
    script.write_text(code)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=ROOT),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline() == "started\n"
        t0 = time.time()
        first = interrupt(proc)
        _, err = proc.communicate(timeout=60)
        return proc.returncode, first + err, time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ctrl_c(times):
    def interrupt(proc):
        proc.send_signal(signal.SIGINT)
        if times == 1:
            return ""
        line = proc.stderr.readline()  # the hook has printed its line: it is in the wait now
        proc.send_signal(signal.SIGINT)
        return line
    return interrupt


def test_ctrl_c_waits_for_the_prewarm_thread_and_a_second_one_ends_it_without_a_traceback(tmp_path):
    """--prewarm's thread is not a daemon, so that an early exit does not tear CUDA down under it.
    One Ctrl-C: one line, and the process waits for the thread. A second one during that wait
    used to print a traceback from Python's own wait at shutdown (threading._shutdown); it now
    ends the process at once, with the same single line, killed by SIGINT as after one Ctrl-C."""
    for times, sleep in ((1, 1.0), (2, 30)):
        marker = tmp_path / f"prewarm_finished_{times}"
        code = _PREWARM_THEN_CTRL_C.format(sleep=sleep, marker=str(marker))
        rc, err, seconds = _run_child(tmp_path, f"ctrl_c_{times}", code, _ctrl_c(times))
        assert err.splitlines() == [ONE_LINE], err[-3000:]
        assert rc == -signal.SIGINT
        if times == 1:
            assert marker.exists()  # the thread ran to its end before the process exited
        else:
            assert seconds < 15 and not marker.exists()  # not after the thread's 30 s


_PREWARM_TAKES_THE_SECOND_CTRL_C = """
import signal, sys, threading, time
import hw2
sys.excepthook = hw2._script_excepthook
def slow_start():  # the kernel may hand a process's SIGINT to any thread: here, to this one
    time.sleep(3)
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    time.sleep(30)
    open({marker!r}, "w").close()
hw2.prewarm_cuda = slow_start
hw2.Prewarm().start()
print("started", flush=True)
time.sleep(60)
"""


def test_a_second_ctrl_c_delivered_to_the_prewarm_thread_still_ends_the_wait(tmp_path):
    """Linux delivers a Ctrl-C to any thread of the process that does not block it. When the
    second one lands on --prewarm's thread, the main thread, blocked in a join without a timeout,
    never saw it and waited the thread's 30 s (CI, 2026-12-01). The wait polls, so the handler
    runs in the main thread within a fraction of a second wherever the signal landed."""
    marker = tmp_path / "prewarm_finished"
    code = _PREWARM_TAKES_THE_SECOND_CTRL_C.format(marker=str(marker))
    rc, err, seconds = _run_child(tmp_path, "ctrl_c_on_thread", code, _ctrl_c(1))
    assert err.splitlines() == [ONE_LINE], err[-3000:]
    assert rc == -signal.SIGINT
    assert seconds < 15 and not marker.exists()  # ~3 s, not after the thread's 33 s


def test_an_error_exit_does_not_wait_for_other_threads(tmp_path):
    """The hook waits for --prewarm's thread alone. Idle pool workers (Inductor's compile pool
    under --compile; ThreadPoolExecutor's workers are not daemons) end only in Python's shutdown,
    after the hook: joining them there would hang the process after its one line."""
    code = ("import sys, concurrent.futures\nimport hw2\nsys.excepthook = hw2._script_excepthook\n"
            "pool = concurrent.futures.ThreadPoolExecutor(1)\npool.submit(int).result()  # held: its worker idles\n"
            "print('started', flush=True)\nraise hw2.HW2Error('data/x.bin: not a CIFAR batch')\n")
    rc, err, seconds = _run_child(tmp_path, "pool_then_error", code, lambda proc: "")
    assert err.splitlines() == ["hw2: error: data/x.bin: not a CIFAR batch"], err[-3000:]
    assert rc == 1 and seconds < 15


def test_a_failed_run_removes_every_output_dir_it_created_and_only_those(tmp_path, monkeypatch):
    monkeypatch.setattr(hw2, "_CREATED_DIRS", [])
    (tmp_path / "mine").mkdir()
    hw2.prepare_output_dir(str(tmp_path / "mine" / "a" / "b" / "c"))  # creates a, a/b, a/b/c
    assert (tmp_path / "mine" / "a" / "b" / "c").is_dir()
    hw2._cleanup_partial_outputs()
    assert os.listdir(tmp_path / "mine") == []  # all three gone, the user's own folder kept


# ------------------------------------------------------------------ unknown variables

def test_unknown_hw2_variable_warns_with_the_closest_name(monkeypatch, capsys):
    monkeypatch.setenv("HW2_EPOCH", "5")
    monkeypatch.setenv("HW2_EPOCHS", "3")  # a real one: no warning
    monkeypatch.setenv("HW2_ZZZ", "1")
    cfg = hw2.parse_config([])
    err = capsys.readouterr().err.splitlines()
    assert cfg.epochs == 3
    assert err[0] == "hw2: warning: HW2_EPOCH is not a hw2 setting and is ignored (did you mean HW2_EPOCHS?)"
    assert err[1].startswith("hw2: warning: HW2_ZZZ is not a hw2 setting and is ignored (known: HW2_PRESET, ")
    assert len(err) == 2


def test_every_flag_has_its_variable(capsys, monkeypatch):
    for action in hw2.build_parser()._actions:
        if action.dest != "help":
            monkeypatch.setenv("HW2_" + action.dest.upper(), "")  # empty = unset, but known
    hw2.parse_config([])
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ the notebook

def execute_copy(tmp_path, env, monkeypatch, edit=None):
    """Run a copy of hw2.ipynb in a fresh kernel (cwd tmp_path); returns (notebook, raised).
    `edit(nb)` may change the copy first (e.g. insert a cell of stand-ins)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(os.path.join(ROOT, "hw2.ipynb"), as_version=4)
    if edit:
        edit(nb)
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
        return nb, False
    except CellExecutionError:
        return nb, True


def outputs_text(nb):
    """Everything the executed notebook's code cells printed."""
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_notebook_shows_an_hw2_error_as_one_line_and_cleans_up(tmp_path, monkeypatch):
    bad = str(tmp_path / "no-such-cifar")
    nb, raised = execute_copy(tmp_path, {"HW2_DATA_DIR": bad, "HW2_PRESET": "smoke",
                                         "HW2_OUTPUT_DIR": "out"}, monkeypatch)
    assert raised  # "Run all" stops at the failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert len(errors) == 1
    assert errors[0]["traceback"] == [f"hw2: error: --data-dir {bad}: no such directory"]
    assert not (tmp_path / "out").exists()  # created by the run, removed like the script does


def test_notebook_trains_on_two_forked_ranks(tmp_path, monkeypatch, tiny_cifar_dir):
    # "Run all" with 2 processes: fork from the kernel (functions defined in __main__), rank 0's
    # table reaches the notebook, outputs written once
    np.save(tmp_path / "test.npy", np.zeros((20, 32, 32, 3), np.uint8))
    nb, raised = execute_copy(tmp_path, {"HW2_GPUS": "2", "HW2_DEVICE": "cpu", "HW2_PRESET": "smoke",
                                         "HW2_DATA_DIR": tiny_cifar_dir, "HW2_OUTPUT_DIR": "out",
                                         "HW2_TEST_NPY": str(tmp_path / "test.npy")}, monkeypatch)
    text = outputs_text(nb)
    assert not raised, text[-3000:]
    assert "data-parallel: 2 processes (gloo)" in text and text.count("train_loss") == 1
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["n_test"] == 20
    shutil.rmtree(tmp_path / "out")


def test_notebook_counts_the_prewarm_wait_in_the_training_time(tmp_path, monkeypatch, tiny_cifar_dir):
    """--prewarm's glue in the real program: the thread starts before the data load, and the
    training cell waits for it inside the training time, where metrics.json records the wait.
    Only the GPU's parts are stand-ins, in a cell inserted before the data cell: the plan of a run
    on one GPU, and a CUDA start that outlasts the data load (a tiny folder: ~0.1 s; fp32 pinned,
    so that no bf16 timing runs in between). The same cell notes the order in which the main
    thread starts the thread and the data load, and a last cell prints it."""
    def stand_ins(nb):
        at = next(i for i, c in enumerate(nb.cells) if "PREWARM = start_prewarm(" in c.source)
        assert nb.cells[at].source.startswith("if RUN")  # the data cell, apart from the definitions
        nb.cells.insert(at, nbformat.v4.new_code_cell(
            "STARTS = []  # the main thread's order of calls\n"
            "prewarm_plan = lambda cfg, hw: (True, '')\n"
            "def prewarm_cuda():\n    time.sleep(4.0)\n"
            "_start_prewarm, _load_data = start_prewarm, load_data\n"
            "def start_prewarm(*args):\n    STARTS.append('prewarm')\n    return _start_prewarm(*args)\n"
            "def load_data(*args):\n    STARTS.append('data')\n    return _load_data(*args)"))
        nb.cells.append(nbformat.v4.new_code_cell("print('STARTS', STARTS)"))

    nb, raised = execute_copy(tmp_path, {"HW2_PRESET": "smoke", "HW2_DATA_DIR": tiny_cifar_dir,
                                         "HW2_OUTPUT_DIR": "out", "HW2_SKIP_ANSWERS": "1", "HW2_PRECISION": "fp32"},
                              monkeypatch, stand_ins)
    text = outputs_text(nb)
    assert not raised, text[-3000:]
    assert "STARTS ['prewarm', 'data']" in text
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    s, epochs = m["seconds"], sum(r["seconds"] for r in m["history"])
    assert m["prewarm"]["error"] is None and m["prewarm"]["seconds"] >= 4.0
    # what the thread had left when training began: most of it, since the data load is short
    # (~0.1 s; the bound leaves 3 s for it and the cells before training on a loaded machine)
    assert 1.0 < s["train_prewarm_wait"] == m["prewarm"]["waited"] <= m["prewarm"]["seconds"]
    # inside the training time, beside its other parts
    assert s["train"] >= s["train_prewarm_wait"] + s["train_setup"] + epochs

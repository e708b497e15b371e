"""`make check`: the notebook executes headlessly top to bottom (answers + smoke training + submission)."""
import json
import os
import subprocess

import pandas as pd

from conftest import ROOT


def test_make_check_executes_the_notebook():
    env = {k: v for k, v in os.environ.items() if not k.startswith("HW2_")}
    # settings left in the caller's shell must not leak into `make check` (each would break it)
    env.update(HW2_TEST_NPY="/nonexistent/test.npy", HW2_EPOCHS="1000", HW2_GPUS="zero",
               HW2_PRECISION="fp16")
    proc = subprocess.run(["make", "-s", "check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    out = os.path.join(ROOT, "build", "check", "out")
    sub = pd.read_csv(os.path.join(out, "submission.csv"))
    assert list(sub.columns) == ["Id", "Category"] and len(sub) > 0
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["preset"] == "smoke" and metrics["epochs"] >= 1
    with open(os.path.join(out, "answers.json")) as f:
        assert abs(json.load(f)["p1"]["p_hat"] - 0.8845) < 1e-3
    # the executed copy holds every cell's output, and no cell raised
    with open(os.path.join(ROOT, "build", "check", "hw2.ipynb")) as f:
        nb = json.load(f)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("execution_count") for c in code)
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))

"""The command line: --answers-only writes valid JSON; HW2_* variables work like flags."""
import json
import os

import pytest

import hw2
from conftest import run_hw2

P1_KEYS = ["z1", "a1", "z2", "p_hat", "dJ_dp_hat", "dp_hat_dz2", "dz2_da1", "da1_dz1", "dz1_dW1", "dJ_dW1"]
P2_KEYS = ["q1_output_hw", "q2_formula", "q3a_weight_shape", "q3a_bias_shape", "q3b_output_shape",
           "q3c_linear_in_features"]
Q3_KEYS = ["token_embedding", "positional_embedding", "encoder_layer", "decoder_layer",
           "final_layer_norms", "output_projection", "total", "assumptions"]
Q4_KEYS = ["parameters", "gradients", "optimizer_state", "activations", "total", "measured_activations"]


@pytest.fixture(scope="module")
def answers_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ans") / "out"
    proc = run_hw2("--answers-only", "--output-dir", out)
    return proc, out


def test_answers_only_writes_valid_json(answers_run):
    proc, out = answers_run
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["answers.json"]  # nothing else: no training ran
    ans = json.loads((out / "answers.json").read_text())
    for key in P1_KEYS:
        assert key in ans["p1"]
    for key in P2_KEYS:
        assert key in ans["p2"]
    for key in Q3_KEYS:
        assert key in ans["p3"]["q3_params"]
    for key in Q4_KEYS:
        assert isinstance(ans["p3"]["q4_memory_bytes"][key], int)
    assert isinstance(ans["p1"]["p_hat"], float) and isinstance(ans["p2"]["q3c_linear_in_features"], int)
    assert "train_loss" not in proc.stdout


def test_skip_answers_trains_without_problems_1_to_3(tmp_path):
    out = tmp_path / "out"
    proc = run_hw2("--preset", "smoke", "--skip-answers", "--output-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Problem 1" not in proc.stdout and "train_loss" in proc.stdout
    assert "answers.json" not in os.listdir(out) and "model.pt" in os.listdir(out)
    assert json.loads((out / "metrics.json").read_text())["seconds"]["answers"] < 1.0


def test_env_vars_work_like_flags(tmp_path):
    out = tmp_path / "from-env"
    proc = run_hw2(env={"HW2_ANSWERS_ONLY": "1", "HW2_OUTPUT_DIR": str(out)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "answers.json").read_text())["p2"]["q1_output_hw"] == [30, 30]


def test_parse_config_reads_env(monkeypatch):
    monkeypatch.setenv("HW2_PRESET", "smoke")
    monkeypatch.setenv("HW2_EPOCHS", "3")
    monkeypatch.setenv("HW2_VAL_SIZE", "10")
    monkeypatch.setenv("HW2_RESUME", "true")
    cfg = hw2.parse_config([])
    assert (cfg.preset, cfg.epochs, cfg.val_size, cfg.resume) == ("smoke", 3, 10, True)
    # an explicit flag beats the environment
    assert hw2.parse_config(["--epochs", "5"]).epochs == 5


def test_kernel_argv_is_ignored_in_a_notebook(monkeypatch):
    # ipykernel starts with `-f kernel.json`; in a notebook argv is not ours to parse.
    monkeypatch.setattr(hw2, "IN_NOTEBOOK", True)
    monkeypatch.setattr("sys.argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel-1.json"])
    monkeypatch.setenv("HW2_PRESET", "quick")
    assert hw2.parse_config().preset == "quick"


def test_default_output_dir_is_outputs_off_kaggle(monkeypatch):
    monkeypatch.delenv("HW2_OUTPUT_DIR", raising=False)
    if os.path.isdir("/kaggle/working"):
        pytest.skip("running on Kaggle")
    assert hw2.parse_config([]).output_dir == "outputs"


def test_importing_runs_nothing():
    assert hw2.RUN is False and hw2.ANSWERS == {}
    assert not hasattr(hw2, "CFG") and not hasattr(hw2, "MODEL")


def test_readme_answers_table_matches_the_answers(answers_run):
    proc, out = answers_run
    ans = json.loads((out / "answers.json").read_text())
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")) as f:
        readme = f.read()
    block = readme.split("<!-- answers:start -->\n")[1].split("\n<!-- answers:end -->")[0]
    assert block == hw2.answers_table(ans), "README answers table is stale: paste hw2.answers_table()"


# ---------------------------------------------------------------- whole numbers and HW2_* variables
def test_whole_number_takes_at_most_18_ascii_digits():
    assert hw2.whole_number(" 007 ") == 7
    assert hw2.whole_number("9" * 18) == 10**18 - 1
    for text in ("9" * 19, "1" * 5000, "-1", "+1", "1.0", "1e3", "\u0662", "\u00b2", "", " "):
        assert hw2.whole_number(text) is None, text


@pytest.mark.parametrize("text,value", [("1", True), ("TRUE", True), (" yes ", True), ("On", True),
                                        ("0", False), ("false", False), ("No", False), ("off", False),
                                        ("", False), ("  ", False)])
def test_boolean_variables_take_the_documented_spellings(no_hw2_env, text, value):
    no_hw2_env.setenv("HW2_DETERMINISTIC", text)
    assert hw2.parse_config([]).deterministic is value


def test_a_blank_variable_means_unset(no_hw2_env):
    no_hw2_env.setenv("HW2_EPOCHS", "   ")
    no_hw2_env.setenv("HW2_PRESET", " ")
    cfg = hw2.parse_config([])
    assert cfg.epochs is None and cfg.preset is None


def test_a_bad_number_variable_says_which_kind_it_expects(no_hw2_env):
    no_hw2_env.setenv("HW2_CHECKPOINT_EVERY", "soon")
    with pytest.raises(hw2.HW2Error, match=r"HW2_CHECKPOINT_EVERY='soon': expected a number$"):
        hw2.parse_config([])
    no_hw2_env.setenv("HW2_CHECKPOINT_EVERY", "2.5")
    assert hw2.parse_config([]).checkpoint_every == 2.5

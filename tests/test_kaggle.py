"""On Kaggle: the competition's test.npy wherever it is mounted, never a submission for another
test set, downloads outside /kaggle/working. A fake /kaggle tree (hw2.KAGGLE_ROOT) stands in."""
import os

import numpy as np
import pytest

import hw2
from conftest import cifar_with_test_batch, write_cifar_batch


pytestmark = pytest.mark.usefixtures("no_hw2_env")


@pytest.fixture
def kaggle(tmp_path, monkeypatch):
    """An empty fake /kaggle with input/ and working/ (the notebook's cwd)."""
    root = tmp_path / "kaggle"
    (root / "input").mkdir(parents=True)
    (root / "working").mkdir()
    monkeypatch.setattr(hw2, "KAGGLE_ROOT", str(root))
    monkeypatch.chdir(root / "working")
    return root


def put_test_npy(folder, n=30):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "test.npy", np.random.default_rng(2).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    return str(folder / "test.npy")


@pytest.mark.parametrize("mount", [["ucsb-cs291k-hw2-2022-fall"],
                                   ["competitions", "ucsb-cs291k-hw2-2022-fall"]])
def test_competition_test_npy_is_found_wherever_mounted(kaggle, mount):
    put_test_npy(kaggle / "input" / "some-dataset")  # a decoy outside the competition's folder
    path = put_test_npy(kaggle.joinpath("input", *mount))
    assert hw2.find_competition_test_npy() == path


@pytest.mark.parametrize("where", [["my-copy-of-the-competition"],
                                   ["datasets", "someone", "my-copy-of-the-competition"]])  # Kaggle's newer mount
def test_a_single_test_npy_elsewhere_is_used(kaggle, where):
    path = put_test_npy(kaggle.joinpath("input", *where))
    assert hw2.find_competition_test_npy() == path


def test_the_search_for_test_npy_stops_three_folders_deep(kaggle):
    # a large attached dataset is not walked
    put_test_npy(kaggle.joinpath("input", "datasets", "someone", "big", "part1"))
    assert hw2.find_competition_test_npy() is None


def test_several_unnamed_test_npy_are_ambiguous(kaggle):
    put_test_npy(kaggle / "input" / "a")
    put_test_npy(kaggle / "input" / "b")
    with pytest.raises(hw2.HW2Error, match="several test.npy.*--test-npy"):
        hw2.find_competition_test_npy()


def test_on_kaggle_without_the_competition_no_submission_for_cifar_test(kaggle, tiny_cifar_dir):
    # The trap: a CIFAR-10 dataset with test_batch attached, the competition not. Predicting
    # test_batch would write a plausible 10,000-row submission that is wrong for the competition.
    cifar_with_test_batch(tiny_cifar_dir, kaggle / "input" / "cifar10")
    cfg = hw2.parse_config(["--preset", "quick", "--val-size", "100"])
    assert cfg.output_dir == str(kaggle / "working")
    with pytest.raises(hw2.HW2Error) as err:
        hw2.load_data(cfg, hw2.PRESETS["quick"])
    msg = str(err.value)
    assert "test.npy" in msg and hw2.COMPETITION in msg and "Add Input" in msg
    # every preset, the smoke dry run included, stops the same way
    with pytest.raises(hw2.HW2Error, match="Add Input"):
        hw2.load_data(hw2.parse_config(["--preset", "smoke"]), hw2.PRESETS["smoke"])


def test_on_kaggle_with_the_competition_its_test_npy_is_predicted(kaggle, tiny_cifar_dir):
    cifar_with_test_batch(tiny_cifar_dir, kaggle / "input" / "cifar10")
    path = put_test_npy(kaggle / "input" / "competitions" / hw2.COMPETITION, n=30)
    cfg = hw2.parse_config(["--preset", "quick"])
    data = hw2.load_data(cfg, hw2.PRESETS["quick"])
    assert data["test_path"] == path and len(data["test_x"]) == 30 and data["test_y"] is None
    assert len(data["val_x"]) == 0  # the submission model sees every training image


def test_explicit_test_npy_is_honoured_on_kaggle(kaggle, tiny_cifar_dir, tmp_path):
    path = put_test_npy(tmp_path / "elsewhere")
    cfg = hw2.parse_config(["--preset", "quick", "--data-dir", tiny_cifar_dir, "--test-npy", path])
    assert hw2.load_data(cfg, hw2.PRESETS["quick"])["test_path"] == path


def test_off_kaggle_cifar_test_batch_is_still_used(tmp_path, tiny_cifar_dir, monkeypatch):
    monkeypatch.setattr(hw2, "KAGGLE_ROOT", str(tmp_path / "no-kaggle-here"))
    folder = cifar_with_test_batch(tiny_cifar_dir, tmp_path / "local")
    cfg = hw2.parse_config(["--preset", "quick", "--data-dir", str(folder), "--val-size", "100"])
    data = hw2.load_data(cfg, hw2.PRESETS["quick"])
    assert data["test_path"] == os.path.join(str(folder), "test_batch") and data["test_y"] is not None


def test_default_val_size_follows_what_is_predicted(tmp_path, monkeypatch):
    """No --val-size: 5,000 held out where the test set's labels are known (CIFAR's own
    test_batch off Kaggle, which is then scored), none for a --test-npy (as on Kaggle: the
    submission model sees every image), 128 for smoke."""
    monkeypatch.setattr(hw2, "KAGGLE_ROOT", str(tmp_path / "no-kaggle-here"))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    g = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_cifar_batch(folder / name, g, 1100)  # 5,500 training images
    npy = put_test_npy(tmp_path / "npy", n=20)
    sizes = {}
    for label, preset, args in [("local", "quick", []), ("npy", "quick", ["--test-npy", npy]), ("smoke", "smoke", [])]:
        data = hw2.load_data(hw2.parse_config(["--preset", preset, "--data-dir", str(folder), *args]), hw2.PRESETS[preset])
        sizes[label] = (len(data["train_x"]), len(data["val_x"]), data["test_y"] is not None)
    assert sizes["local"] == (500, 5000, True) and sizes["npy"] == (5500, 0, False) and sizes["smoke"][1] == 128


def test_download_lands_outside_kaggle_working(kaggle, tmp_path, monkeypatch):
    import tempfile

    import torchvision
    roots = []

    def fake_cifar10(root, train, download):
        roots.append(os.path.abspath(root))
        folder = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(folder)
        open(os.path.join(folder, "data_batch_1"), "wb").close()

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    folder, source = hw2.find_data_dir(None)
    assert source == "download" and roots == [str(tmp_path / "tmp" / "hw2-cifar10")]
    assert not folder.startswith(str(kaggle / "working")) and os.listdir(kaggle / "working") == []
    assert hw2.find_data_dir(None)[0] == folder and len(roots) == 1  # found again, not re-downloaded


def test_download_off_kaggle_still_goes_to_data(tmp_path, monkeypatch):
    import torchvision
    roots = []
    monkeypatch.setattr(hw2, "KAGGLE_ROOT", str(tmp_path / "no-kaggle-here"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10",
                        lambda root, train, download: roots.append(root) or os.makedirs(
                            os.path.join(root, "cifar-10-batches-py")) or open(
                            os.path.join(root, "cifar-10-batches-py", "data_batch_1"), "wb").close())
    assert hw2.find_data_dir(None) == (os.path.join("data", "cifar-10-batches-py"), "download")
    assert roots == ["data"]


def test_default_output_dir_on_kaggle(kaggle):
    assert hw2.parse_config([]).output_dir == str(kaggle / "working")

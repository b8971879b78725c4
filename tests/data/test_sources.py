"""Data sources: real MNIST from the wheel, IDX files, digits, the user's CSV and npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmt_tf.data import files, sources
from lmt_tf.data.idx import read_idx, write_idx
from lmt_tf.data.splits import Split, hold_out
from lmt_tf.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def mnist() -> dict[str, np.ndarray]:
    return sources.read_mnist_arrays(verify=True)


def test_mnist_is_the_full_verified_set(mnist) -> None:
    assert mnist["train_images"].shape == (60000, 28, 28)
    assert mnist["test_images"].shape == (10000, 28, 28)
    assert mnist["train_images"].dtype == np.uint8
    # Canonical class counts of MNIST's training and test labels.
    assert np.bincount(mnist["train_labels"]).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(mnist["test_labels"]).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_checksum_mismatch_is_detected(monkeypatch) -> None:
    monkeypatch.setitem(sources.MNIST_SHA256, "test_labels", "0" * 64)
    with pytest.raises(DataError, match="test_labels .* has SHA-256"):
        sources.read_mnist_arrays()


def test_load_mnist_holds_out_validation() -> None:
    splits = sources.load_mnist(validation_size=5000)
    assert splits.sizes() == {"train": 55000, "validation": 5000, "test": 10000}
    assert splits.input_shape == (28, 28) and splits.num_classes == 10


def test_hold_out_is_seeded_disjoint_and_complete() -> None:
    data = Split(np.arange(100), np.arange(100) % 3)
    rest, held = hold_out(data, 20, seed=5)
    again, _ = hold_out(data, 20, seed=5)
    assert len(held) == 20 and len(rest) == 80
    assert sorted([*rest.x, *held.x]) == list(range(100))
    np.testing.assert_array_equal(rest.x, again.x)
    with pytest.raises(ConfigError):
        hold_out(data, 100, seed=0)


def test_idx_round_trip(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        write_idx(tmp_path / name, images)
        np.testing.assert_array_equal(read_idx(tmp_path / name), images)
    floats = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
    write_idx(tmp_path / "f.idx", floats)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx"), floats)


def test_idx_rejects_truncated_and_foreign_files(tmp_path: Path) -> None:
    write_idx(tmp_path / "x.idx", np.zeros((4, 4), np.uint8))
    (tmp_path / "cut.idx").write_bytes((tmp_path / "x.idx").read_bytes()[:-3])
    with pytest.raises(DataError, match="header says shape"):
        read_idx(tmp_path / "cut.idx")
    (tmp_path / "text.idx").write_text("hello world")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "text.idx")


def test_idx_directory_source_reads_standard_files(tmp_path: Path, mnist) -> None:
    """Any directory holding the four standard .gz files is a source (here MNIST's)."""
    for key, name in sources._IDX_FILES.items():
        write_idx(tmp_path / name, mnist[key][:600] if "train" in key else mnist[key][:100])
    splits = sources.load_fashion_mnist(str(tmp_path), validation_size=100)
    assert splits.sizes() == {"train": 500, "validation": 100, "test": 100}
    np.testing.assert_array_equal(splits.test.x, mnist["test_images"][:100])
    assert splits.class_names == ()  # not Fashion-MNIST's: its names would be wrong here


def test_missing_fashion_mnist_directory_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        sources.load_fashion_mnist(str(tmp_path / "absent"))


@pytest.mark.skipif(not Path(sources.FASHION_MNIST_DIR).is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package() -> None:
    splits = sources.load_fashion_mnist()
    assert splits.sizes() == {"train": 55000, "validation": 5000, "test": 10000}
    assert np.bincount(splits.test.y).tolist() == [1000] * 10
    assert splits.class_name(0) == "T-shirt/top" and splits.class_name(9) == "Ankle boot"


def test_digits_three_way_split() -> None:
    splits = sources.load_digits()
    assert sum(splits.sizes().values()) == 1797
    # Raw pixel values 0-16; the model rescales them by pixel_scale.
    assert splits.train.x.dtype == np.float32 and splits.train.x.max() == 16.0
    assert splits.pixel_scale == 1 / 16


def test_csv_source(tmp_path: Path) -> None:
    rows = ["a,b,label"] + [f"{i},{i * 2},{i % 3}" for i in range(50)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    splits = files.load_csv(str(tmp_path / "d.csv"), validation_fraction=0.2,
                              test_fraction=0.2)
    assert splits.sizes() == {"train": 30, "validation": 10, "test": 10}
    assert splits.num_classes == 3 and splits.input_shape == (2,)
    row = splits.train.x[0]
    assert row[1] == 2 * row[0] and splits.train.y[0] == int(row[0]) % 3
    with pytest.raises(DataError, match="no column 'target'"):
        files.load_csv(str(tmp_path / "d.csv"), label_column="target")


@pytest.mark.parametrize("rows, message", [
    # a fractional label was truncated to a class (0.5 -> 0, 1.7 -> 1)
    (["1,2,0", "3,4,0.5", "5,6,1.7"], "line 3, column 'label': '0.5' is not a class id"),
    (["1,2,0", "3,4,1", "5,6,1e300"], "line 4, column 'label': '1e300' is not a class id"),
    (["1,2,0", "3,4,1", "5,6,inf"], "line 4, column 'label': 'inf' is not a class id"),
    (["1,2,0", "3,-inf,1", "5,6,1"], "line 3, column 'b': '-inf' is not a finite number"),
    (["1,2,0", "3,4,1", "Infinity,6,1"], "line 4, column 'a': 'Infinity' is not a finite"),
])
def test_csv_values_that_are_no_label_or_feature_are_named_by_line_and_column(
        tmp_path: Path, rows: list[str], message: str) -> None:
    (tmp_path / "d.csv").write_text("\n".join(["a,b,label", *rows, *["7,8,1"] * 30]) + "\n")
    with pytest.raises(DataError) as error:
        files.load_csv(str(tmp_path / "d.csv"))
    assert str(error.value).startswith(f"{tmp_path / 'd.csv'}, {message}"), str(error.value)


def test_csv_missing_cells_stay_missing_values(tmp_path: Path) -> None:
    rows = ["a,b,label"] + [f"{i},{'' if i % 5 == 0 else i},{i % 2}" for i in range(40)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    splits = files.load_csv(str(tmp_path / "d.csv"))
    assert np.isnan(splits.train.x).any()  # for Preprocessing.impute, not refused here


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((20, 2)), "y": np.r_[0, 0.2, np.ones(18)]},
     "p.npz: y[1] = 0.2 is not a class id"),
    ({"x": np.r_[np.zeros((3, 2)), [[0, np.inf]], np.zeros((16, 2))], "y": np.arange(20) % 2},
     "p.npz: x[3, 1] = inf is not a finite number"),
    ({"x_train": np.zeros((20, 2)), "y_train": np.arange(20) % 2, "x_test": np.zeros((4, 2)),
      "y_test": np.array([0, 1, 1.5, 0])}, "p.npz: y_test[2] = 1.5 is not a class id"),
    ({"x": np.zeros((20, 2)), "y": np.array(["a", "b"] * 10)},
     "p.npz: y holds <U1 values, not integer labels"),
])
def test_npz_values_that_are_no_label_or_feature_are_named(tmp_path: Path, arrays: dict,
                                                            message: str) -> None:
    np.savez(tmp_path / "p.npz", **arrays)
    with pytest.raises(DataError) as error:
        files.load_npz(str(tmp_path / "p.npz"))
    assert str(error.value).startswith(f"{tmp_path}/{message}"), str(error.value)


def test_npz_source(tmp_path: Path) -> None:
    np.savez(tmp_path / "p.npz", x_train=np.zeros((40, 3)), y_train=np.arange(40) % 4,
             x_test=np.ones((8, 3)), y_test=np.arange(8) % 4)
    splits = files.load_npz(str(tmp_path / "p.npz"), validation_fraction=0.25)
    assert splits.sizes() == {"train": 30, "validation": 10, "test": 8}
    assert splits.num_classes == 4
    with pytest.raises(DataError, match="npz file not found"):
        files.load_npz(str(tmp_path / "none.npz"))


def test_movielens_100k_from_recbole() -> None:
    splits = sources.load_movielens()
    assert splits.sizes() == {"train": 80000, "validation": 10000, "test": 10000}
    every = np.concatenate([splits.train.x, splits.validation.x, splits.test.x])
    assert every.dtype == np.int64 and every.shape[1] == 2
    assert len(np.unique(every[:, 0])) == 943 and len(np.unique(every[:, 1])) == 1682
    assert every[:, 0].max() == 942 and every[:, 1].max() == 1681  # ids from 0, no gaps
    ratings = np.concatenate([splits.train.y, splits.validation.y, splits.test.y])
    assert sorted(set(ratings.tolist())) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert splits.num_classes == 1


def test_every_packaged_classifier_names_its_classes_in_label_order() -> None:
    from sklearn.datasets import load_breast_cancer

    cancer = sources.load_breast_cancer()
    # scikit-learn's target 0 is a malignant tumour: the first output column says so.
    assert cancer.class_names == ("malignant", "benign")
    assert [cancer.class_name(c) for c in (0, 1)] == list(load_breast_cancer().target_names)
    assert sources.load_digits().class_names == tuple("0123456789")
    assert sources.load_digits(mnist_like=True).class_names == tuple("0123456789")
    assert sources.few_shot(sources.load_digits, 2).class_names == tuple("0123456789")
    assert sources.FASHION_MNIST_CLASSES[0] == "T-shirt/top"
    assert sources.FASHION_MNIST_CLASSES[9] == "Ankle boot"
    assert sources.load_movielens().class_names == ()  # a regression: no classes


def test_a_users_files_may_name_their_classes(tmp_path: Path) -> None:
    rows = ["a,b,label"] + [f"{i},{i * 2},{i % 2}" for i in range(30)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    named = files.load_csv(str(tmp_path / "d.csv"), class_names=("no", "yes")).validate()
    assert named.class_names == ("no", "yes") and named.class_name(1) == "yes"
    assert files.load_csv(str(tmp_path / "d.csv")).class_name(1) == "1"  # the id
    # Three names for labels 0 and 1: the third class has no examples, but is a class.
    assert files.load_csv(str(tmp_path / "d.csv"), class_names=("a", "b", "c")).num_classes == 3
    with pytest.raises(ConfigError, match="load_csv.class_names has 1 names, but .*d.csv has "
                                          "labels up to 1"):
        files.load_csv(str(tmp_path / "d.csv"), class_names=("only",))
    np.savez(tmp_path / "p.npz", x=np.zeros((20, 2)), y=np.arange(20) % 2,
             class_names=np.array(["cat", "dog"]))
    assert files.load_npz(str(tmp_path / "p.npz")).validate().class_names == ("cat", "dog")
    np.savez(tmp_path / "q.npz", x=np.zeros((20, 2)), y=np.arange(20) % 2,
             class_names=np.array([3, 4]))
    with pytest.raises(DataError, match="q.npz: class_names must be a 1-D array of strings"):
        files.load_npz(str(tmp_path / "q.npz"))


def test_two_classes_of_one_name_are_refused() -> None:
    import dataclasses

    splits = dataclasses.replace(sources.load_digits(), class_names=tuple("0123456780"))
    with pytest.raises(DataError, match="class name '0' names more than one class"):
        splits.validate()

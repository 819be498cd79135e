"""Leakage audit: planted exact and near-duplicates are found, reported once and kept in one fold by data.groups."""

from __future__ import annotations

import csv
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig
from PIL import Image
from sklearn.model_selection import StratifiedKFold

from src.analysis.duplicates import audit_duplicates, find_pairs, hash_images
from src.data import FoldDataModule, assign_folds, read_groups, scan_image_folder
from src.errors import UserError
from src.sample_data import write_digits
from src.tracking.identity import identity
from tests.conftest import write_images

# The planted duplicates: (path_a, path_b, kind, where); b is under test/ for train-test pairs.
PLANTED = {
    ("cat/000.png", "cat/900_copy.png", "exact", "train-train"),
    ("dog/001.png", "dog/901_jpeg.jpg", "near", "train-train"),
    ("dog/001.png", "dog/902_pixel.png", "near", "train-train"),
    ("dog/901_jpeg.jpg", "dog/902_pixel.png", "near", "train-train"),
    ("fox/002.png", "fox/903_leak.png", "exact", "train-test"),
}
GROUPS = [{"cat/000.png", "cat/900_copy.png"}, {"dog/001.png", "dog/901_jpeg.jpg", "dog/902_pixel.png"}]


@pytest.fixture
def leaky_root(tmp_path: Path) -> Path:
    """Tinted-noise classes (9 train images each, 3 test) plus planted duplicates: a copied file, a JPEG
    re-encode and a one-pixel change of one image, and a training image copied into the test set."""
    root = tmp_path / "leaky"
    write_images(root / "train", per_class=9)
    write_images(root / "test", per_class=3, seed=1)
    train = root / "train"
    shutil.copyfile(train / "cat" / "000.png", train / "cat" / "900_copy.png")
    original = Image.open(train / "dog" / "001.png").convert("RGB")
    original.save(train / "dog" / "901_jpeg.jpg", quality=90)
    pixels = np.asarray(original).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(train / "dog" / "902_pixel.png")
    shutil.copyfile(train / "fox" / "002.png", root / "test" / "fox" / "903_leak.png")
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_audit_finds_the_planted_duplicates_and_warns_once(
    leaky_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = scan_image_folder(leaky_root / "train")
    folds = assign_folds(images.targets, images.classes, 3, 42)
    with caplog.at_level(logging.INFO, logger="src.analysis.duplicates"):
        audit = audit_duplicates(images, folds, leaky_root / "test", tmp_path / "out", 4, tmp_path / "cache")
    rows = read_rows(tmp_path / "out" / "duplicates.csv")
    assert {(r["path_a"], r["path_b"], r["kind"], r["where"]) for r in rows} == PLANTED  # and no noise image
    assert (audit.exact, audit.near, audit.train_test) == (2, 3, 1)
    split = [r for r in rows if r["split_across_folds"] == "true"]
    assert audit.split_across_folds == len(split)
    for r in rows:
        if r["where"] == "train-train":
            fold_a, fold_b = folds[images.paths.index(r["path_a"])], folds[images.paths.index(r["path_b"])]
            assert (r["fold_a"], r["fold_b"]) == (str(fold_a), str(fold_b))
            assert r["split_across_folds"] == str(fold_a != fold_b).lower()
        else:
            assert r["fold_b"] == r["split_across_folds"] == ""
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 exact and 3 near-duplicate image pairs" in warnings[0] and "1 shared with data.test_dir" in warnings[0]
    assert str(tmp_path / "out" / "duplicates.csv") in warnings[0]
    assert ("data.groups=auto" in warnings[0]) == bool(split)
    # The next job of a sweep writes its own duplicates.csv: the same finding, information this time.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="src.analysis.duplicates"):
        audit_duplicates(images, folds, leaky_root / "test", tmp_path / "out2", 4, tmp_path / "cache")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(tmp_path / "out2" / "duplicates.csv") in r.getMessage() for r in caplog.records)


def test_distinct_images_are_not_near_duplicates(tmp_path: Path) -> None:
    """Tinted noise and scikit-learn's handwritten digits hold no copies; the threshold must not flag them broadly."""
    noise = scan_image_folder(write_images(tmp_path / "noise", per_class=40))
    assert find_pairs(hash_images(noise.root, noise.paths), 4) == []
    write_digits(tmp_path / "digits")
    digits = scan_image_folder(tmp_path / "digits" / "train")
    pairs = find_pairs(hash_images(digits.root, digits.paths), 4)
    # 8x8 digits are coarse: a few dozen pairs of very alike drawings of one digit come within 4 bits, no more.
    involved = {p.a for p in pairs} | {p.b for p in pairs}
    assert all(p.kind == "near" for p in pairs) and len(involved) < 0.1 * len(digits.paths)
    assert all(digits.targets[p.a] == digits.targets[p.b] for p in pairs)


def test_hashes_are_cached_by_file_content(leaky_root: Path, tmp_path: Path) -> None:
    images = scan_image_folder(leaky_root / "train")
    first = hash_images(images.root, images.paths, tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("image_hashes_*.json")
    again = hash_images(images.root, images.paths, tmp_path / "cache")
    assert again.sha256 == first.sha256 and np.array_equal(again.phash, first.phash)
    assert cache_file.read_text().count('":"') == len(set(first.sha256))  # one entry per distinct file


def groups_in_one_fold(dm: FoldDataModule, groups: list[set[str]]) -> None:
    fold_of = {row["path"]: row["fold"] for row in dm.split_rows()}
    for group in groups:
        assert len({fold_of[p] for p in group}) == 1, group


def test_groups_auto_keeps_duplicates_in_one_fold(leaky_root: Path, tmp_path: Path) -> None:
    for seed in range(4):  # a plain StratifiedKFold splits some of these groups for most seeds
        dm = FoldDataModule(
            str(leaky_root / "train"), 0, n_folds=3, split_seed=seed, num_workers=0, groups="auto", hash_cache_dir=None
        )
        dm.setup()
        groups_in_one_fold(dm, GROUPS)
        assert np.bincount(dm.folds).min() > 0
        audit = audit_duplicates(dm.images, dm.folds, None, tmp_path / str(seed), 4)
        assert audit.split_across_folds == 0 and audit.train_test == 0


def test_without_groups_the_split_is_the_plain_stratified_kfold(image_root: Path) -> None:
    """Existing users keep their folds (and so their split digest) byte for byte."""
    dm = FoldDataModule(str(image_root / "train"), 0, n_folds=3, split_seed=7, num_workers=0)
    dm.setup()
    expected = np.empty(len(dm.images.paths), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=3, shuffle=True, random_state=7)
    for k, (_, val) in enumerate(splitter.split(np.zeros(len(expected)), dm.images.targets)):
        expected[val] = k
    assert np.array_equal(dm.folds, expected)


def test_a_groups_csv_keeps_each_group_in_one_fold(leaky_root: Path, tmp_path: Path) -> None:
    images = scan_image_folder(leaky_root / "train")
    # Groups of three consecutive images per class; absolute paths are accepted too.
    rows = ["path,group"] + [
        f"{images.root / p if i % 2 else p},{images.classes[t]}-{i // 3}"
        for i, (p, t) in enumerate(zip(images.paths, images.targets, strict=True))
    ]
    (tmp_path / "groups.csv").write_text("\n".join(rows) + "\n")
    dm = FoldDataModule(str(leaky_root / "train"), 1, n_folds=3, num_workers=0, groups=str(tmp_path / "groups.csv"))
    dm.setup()
    labels = read_groups(tmp_path / "groups.csv", images)
    groups_in_one_fold(dm, [{p for p, g in zip(images.paths, labels, strict=True) if g == x} for x in set(labels)])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("file,label\ncat/000.png,a\n", "has no path and group columns"),
        ("path,group\ncat/000.png,\n", "line 2 lacks a path or a group"),
        ("path,group\ncat/000.png,a\ncat/000.png,b\n", "gives cat/000.png a second group"),
        ("path,group\ncat/000.png,a\n", "has no group for 29 of the 30 images"),
    ],
)
def test_a_bad_groups_csv_is_one_line_that_says_what_to_do(
    leaky_root: Path, tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "groups.csv"
    if content is not None:
        path.write_text(content)
    dm = FoldDataModule(str(leaky_root / "train"), 0, n_folds=3, num_workers=0, groups=str(path))
    with pytest.raises(UserError, match=message) as err:
        dm.setup()
    assert "\n" not in str(err.value) and "path,group" in str(err.value)


def test_bad_near_duplicate_distance_is_a_user_error(leaky_root: Path, tmp_path: Path) -> None:
    images = scan_image_folder(leaky_root / "train")
    with pytest.raises(UserError, match="near_duplicate_distance=64"):
        audit_duplicates(images, None, None, tmp_path, 64)


def test_groups_are_part_of_a_configurations_identity(make_cfg: Callable[..., DictConfig]) -> None:
    plain, auto = identity(make_cfg(), {}), identity(make_cfg("data.groups=auto"), {})
    assert "data.groups" not in plain and auto["data.groups"] == "auto"


def test_training_audits_once_and_groups_the_split(
    leaky_root: Path, make_cfg: Callable[..., DictConfig], caplog: pytest.LogCaptureFixture
) -> None:
    """A real (tiny) training run: one warning, duplicates.csv and split.csv in its folder, groups kept together."""
    from src.training import train

    data = [f"data.train_dir={leaky_root / 'train'}", f"data.test_dir={leaky_root / 'test'}"]
    cfg = make_cfg(*data, "data.groups=auto", "n_folds=3")
    with caplog.at_level(logging.INFO, logger="src.analysis.duplicates"):
        train(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.name == "src.analysis.duplicates"]
    assert len(warnings) == 1 and "1 shared with data.test_dir" in warnings[0] and "0 of them split" in warnings[0]
    out = Path(cfg.paths.output_dir)
    assert {(r["path_a"], r["path_b"], r["kind"], r["where"]) for r in read_rows(out / "duplicates.csv")} == PLANTED
    fold_of = {r["path"]: r["fold"] for r in read_rows(out / "split.csv")}
    assert all(len({fold_of[p] for p in group}) == 1 for group in GROUPS)

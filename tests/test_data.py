"""Data: scanning, skipping bad files, image modes, stratified folds, the sample digits, preprocessing,
augmentation, MixUp/CutMix and the balanced sampler."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src import file_memo
from src.data import FoldDataModule, MixCollate, assign_folds, build_transform, scan_image_folder, to_rgb
from src.errors import UserError
from src.preprocessing import IMAGENET_MEAN, IMAGENET_STD, resolve_preprocessing
from src.sample_data import write_digits
from tests.conftest import ROOT, write_images


def test_folds_are_stratified_disjoint_covering_and_repeatable() -> None:
    targets = np.repeat(np.arange(3), [10, 20, 30])
    folds = assign_folds(targets, ["a", "b", "c"], n_folds=5, split_seed=7)
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3, 4]  # covering: every sample has exactly one fold
    for k in range(5):
        counts = np.bincount(targets[folds == k], minlength=3)
        assert counts.tolist() == [2, 4, 6]  # stratified: each fold holds a fifth of each class
    assert np.array_equal(folds, assign_folds(targets, ["a", "b", "c"], 5, 7))
    assert not np.array_equal(folds, assign_folds(targets, ["a", "b", "c"], 5, 8))


def test_datamodule_validates_on_its_fold_and_trains_on_the_rest(image_root: Path) -> None:
    seen = []
    for fold in range(3):
        dm = FoldDataModule(str(image_root / "train"), fold=fold, n_folds=3, image_size=32, num_workers=0)
        train, val = set(dm.indices(True)), set(dm.indices(False))
        assert train.isdisjoint(val) and len(train | val) == 18
        seen.extend(val)
        x, y = next(iter(dm.val_dataloader()))
        assert x.shape[1:] == (3, 32, 32) and x.dtype.is_floating_point
    assert sorted(seen) == list(range(18))
    rows = dm.split_rows()
    assert {r["class"] for r in rows} == {"cat", "dog", "fox"} and {r["fold"] for r in rows} == {0, 1, 2}


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if image.mode != "CMYK" else "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("L", lambda: Image.new("L", (4, 4), 200)),
        ("LA", lambda: Image.new("LA", (4, 4), (200, 255))),
        ("P", lambda: Image.new("RGB", (4, 4), (200, 200, 200)).convert("P", palette=Image.Palette.ADAPTIVE)),
        ("RGBA", lambda: Image.new("RGBA", (4, 4), (200, 200, 200, 255))),
        ("CMYK", lambda: Image.new("RGB", (4, 4), (200, 200, 200)).convert("CMYK")),
        ("I;16", lambda: Image.fromarray(np.full((4, 4), 200 * 257, dtype=np.uint16))),
    ],
)
def test_every_image_mode_becomes_rgb(mode: str, make) -> None:
    image = make()
    assert image.mode == mode
    reloaded = Image.open(io.BytesIO(_png_bytes(image)))
    for candidate in (image, reloaded):
        rgb = to_rgb(candidate)
        assert rgb.mode == "RGB"
        assert np.abs(np.asarray(rgb, dtype=int) - 200).max() <= 3, mode  # 16-bit is scaled, not clipped to 255


def test_a_photo_stored_sideways_is_decoded_upright(tmp_path: Path) -> None:
    """EXIF orientation 6 (a phone held upright): training, prediction and serving all see what a viewer shows."""
    from src.data import load_image
    from src.serving import load_image as served_load_image

    stored = np.zeros((30, 70, 3), dtype=np.uint8)
    stored[:, :35] = (250, 0, 0)  # left half red as stored: the top half once turned upright
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    from src.data import IMAGE_EXTENSIONS
    from src.serving.ensemble_model import IMAGE_EXTENSIONS as SERVED_EXTENSIONS

    assert SERVED_EXTENSIONS == IMAGE_EXTENSIONS  # the self-contained served copy reads what training reads
    for load in (load_image, served_load_image):
        image = load(tmp_path / "phone.jpg")
        assert image.size == (30, 70)
        pixels = np.asarray(image)
        assert pixels[:30, :, 0].mean() > 200 and pixels[40:, :, 0].mean() < 50


def test_transparent_pixels_become_white() -> None:
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert np.asarray(to_rgb(rgba)).min() == 255


def test_bad_files_are_skipped_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_images(tmp_path / "train", per_class=3)
    good_png = (root / "cat" / "000.png").read_bytes()
    (root / "cat" / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(jpeg, format="JPEG")
    (root / "dog" / "truncated.jpg").write_bytes(jpeg.getvalue()[:-200])
    (root / "dog" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "fox" / "notes.txt").write_text("not an image")
    (root / "fox" / "fake.png").write_text("not a png")
    with caplog.at_level(logging.WARNING):
        images = scan_image_folder(root)
    assert len(images.paths) == 9 and images.classes == ["cat", "dog", "fox"]
    assert sorted(images.skipped) == sorted(
        ["cat/truncated.png", "dog/truncated.jpg", "dog/.DS_Store", "fox/notes.txt", "fox/fake.png"]
    )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dog/.DS_Store" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        scan_image_folder(root)  # the next job of a sweep, in the same process: recorded, not warned again
    assert [r.levelno for r in caplog.records if "dog/.DS_Store" in r.getMessage()] == [logging.INFO]


def test_links_macos_junk_and_unicode_forms(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What zips and file managers leave in a folder: symlinked sub-folders are followed (a loop ends), broken
    links are listed as skipped, __MACOSX is no class, .jfif is a JPEG, and a decomposed `café` (macOS) is
    the same class as a composed one."""
    import unicodedata

    root = write_images(tmp_path / "train", per_class=2)
    extra = write_images(tmp_path / "extra", per_class=2)
    (root / "cat" / "more").symlink_to(extra / "dog", target_is_directory=True)
    (root / "cat" / "loop").symlink_to(root / "cat", target_is_directory=True)
    (root / "dog" / "gone.png").symlink_to(tmp_path / "missing.png")
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "dog" / "photo.jfif", format="JPEG")
    write_images(root / "__MACOSX", per_class=1)
    decomposed = unicodedata.normalize("NFD", "café")
    (root / "fox").rename(root / decomposed)
    with caplog.at_level(logging.WARNING):
        images = scan_image_folder(root)
    assert images.classes == ["café", "cat", "dog"] and images.classes[0] == unicodedata.normalize("NFC", "café")
    counts = dict(zip(images.classes, np.bincount(images.targets), strict=True))
    assert counts == {"cat": 4, "café": 2, "dog": 3}, counts
    assert "cat/more/000.png" in images.paths and "dog/photo.jfif" in images.paths
    assert not any("loop/loop" in p for p in images.paths)
    assert images.skipped == ["dog/gone.png"]
    assert any("__MACOSX" in r.getMessage() for r in caplog.records)


def test_a_file_fact_is_reused_until_the_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """src/file_memo.py: the jobs of a sweep read and check each image once; a changed file is read again."""
    path = tmp_path / "a.png"
    path.write_bytes(b"first")
    calls: list[bytes] = []

    def compute(p: Path) -> bytes:
        calls.append(p.read_bytes())
        return calls[-1]

    assert [file_memo.remembered(path, "test", compute) for _ in range(2)] == [b"first"] * 2
    assert len(calls) == 2, "a file written in the last 2 s is read again: its timestamp may not show a rewrite"
    monkeypatch.setattr(file_memo, "RACY_NS", 0)  # as if the file were older
    assert [file_memo.remembered(path, "test", compute) for _ in range(2)] == [b"first"] * 2
    assert len(calls) == 3
    time.sleep(0.05)  # past the file system's timestamp granularity
    path.write_bytes(b"other")  # the same size, new content
    assert file_memo.remembered(path, "test", compute) == b"other" and len(calls) == 4
    assert file_memo.sha256(path) == hashlib.sha256(b"other").hexdigest()
    path.unlink()
    with pytest.raises(FileNotFoundError):
        file_memo.remembered(path, "test", compute)


def test_a_later_process_finds_the_facts_in_the_store(tmp_path: Path) -> None:
    """file_memo.use_store: a single-fold run or a launcher's job finds what an earlier process learned; a file
    found unreadable is checked again."""
    (tmp_path / "a.png").write_bytes(b"image")
    (tmp_path / "b.png").write_bytes(b"broken")
    script = """
import sys
from pathlib import Path
from src import file_memo
file_memo.RACY_NS = 0
file_memo.use_store(sys.argv[1])
def compute(path):
    if sys.argv[2] == "again":
        raise SystemExit(f"computed {path.name} again")
    return path.name == "a.png"
print([file_memo.remembered(Path(sys.argv[1]) / n, "readable_image", compute) for n in ("a.png", "b.png")])
file_memo.save()
"""

    def run(mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script, str(tmp_path), mode], capture_output=True, text=True, cwd=ROOT, timeout=120
        )

    assert run("first").stdout.strip() == "[True, False]"
    assert (tmp_path / file_memo.STORE_FILE).is_file()
    again = run("again")
    assert again.returncode != 0 and again.stderr.strip() == "computed b.png again", again.stderr
    (tmp_path / file_memo.STORE_FILE).write_text("{not json")  # a damaged store is ignored, then rewritten
    assert run("first").stdout.strip() == "[True, False]"
    assert "a.png" in (tmp_path / file_memo.STORE_FILE).read_text()


def test_the_facts_store_forgets_files_that_are_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """file_memo.save: facts about deleted or renamed files leave the store with the next new fact."""
    for name, value in (("_facts", {}), ("_new", set()), ("_store", None), ("RACY_NS", 0)):
        monkeypatch.setattr(file_memo, name, value)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.png", "b.png"):
        (data / name).write_bytes(name.encode())
    file_memo.use_store(tmp_path / "cache")
    stored = tmp_path / "cache" / file_memo.STORE_FILE

    def names() -> set[str]:
        return {Path(key.partition("\0")[2]).name for key in json.loads(stored.read_text())["facts"]}

    for name in ("a.png", "b.png"):
        file_memo.sha256(data / name)
    file_memo.save()
    assert names() == {"a.png", "b.png"}
    (data / "a.png").rename(data / "c.png")
    file_memo.sha256(data / "c.png")
    file_memo.save()
    assert names() == {"b.png", "c.png"}


def test_missing_data_dir_says_how_to_get_data(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="dvc pull"):
        scan_image_folder(tmp_path / "nope")


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    root = write_images(tmp_path / "train", per_class=3)
    (root / "empty").mkdir()
    with pytest.raises(UserError, match="empty has no readable images"):
        scan_image_folder(root)


def test_class_with_fewer_images_than_folds_is_an_error(tmp_path: Path) -> None:
    root = write_images(tmp_path / "train", per_class=3)
    dm = FoldDataModule(str(root), fold=0, n_folds=5, image_size=32, num_workers=0)
    with pytest.raises(UserError, match="at least n_folds=5"):
        dm.setup()


@pytest.mark.parametrize("fold", [-1, 5, 9])
def test_fold_outside_range_is_an_error(tmp_path: Path, fold: int) -> None:
    with pytest.raises(UserError, match=r"outside \[0, 5\)"):
        FoldDataModule(str(tmp_path), fold=fold, n_folds=5)


def test_sample_digits_are_byte_identical_and_never_mix_with_other_data(tmp_path: Path) -> None:
    counts = write_digits(tmp_path / "a")
    write_digits(tmp_path / "b")
    assert counts == {"train": 1437, "test": 360}
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    assert len(list((tmp_path / "a" / "train").iterdir())) == 10
    write_digits(tmp_path / "a")  # rewriting the sample over itself is fine
    (tmp_path / "a" / "train" / "3" / "mine.png").write_bytes(b"user data")
    with pytest.raises(UserError, match="not the sample digits"):
        write_digits(tmp_path / "a")
    assert (tmp_path / "a" / "train" / "3" / "mine.png").read_bytes() == b"user data"


def test_preprocessing_follows_the_weights_unless_data_settings_say_otherwise(tmp_path: Path) -> None:
    resnet = resolve_preprocessing("resnet50", "IMAGENET1K_V2")  # read from the weights enum, nothing downloaded
    assert (resnet.resize_size, resnet.crop_size, resnet.interpolation) == (232, 224, "bilinear")
    assert resnet.mean == IMAGENET_MEAN and resnet.source == "resnet50 IMAGENET1K_V2"
    assert resolve_preprocessing("efficientnet_b0", "IMAGENET1K_V1").interpolation == "bicubic"
    small = resolve_preprocessing("resnet50", "IMAGENET1K_V2", image_size=112)  # the weights' resize/crop ratio
    assert (small.resize_size, small.crop_size) == (116, 112)
    explicit = resolve_preprocessing(
        "resnet50", "IMAGENET1K_V2", 32, resize_size=40, interpolation="nearest", mean=[0.5] * 3, std=[0.25] * 3
    )
    assert explicit.as_dict() == {
        "crop_size": 32, "resize_size": 40, "interpolation": "nearest", "mean": [0.5] * 3, "std": [0.25] * 3
    }  # fmt: skip
    for weights in (None, str(tmp_path / "own.pth")):  # no weights metadata: today's behaviour
        plain = resolve_preprocessing("resnet50", weights, 32)
        assert (plain.resize_size, plain.crop_size, plain.interpolation) == (32, 32, "bilinear")
        assert plain.std == IMAGENET_STD
    for bad in ({"resize_size": 16}, {"interpolation": "lanczos2"}, {"std": [1, 0, 1]}):
        with pytest.raises(UserError, match="data."):
            resolve_preprocessing("resnet18", None, 32, **bad)


def test_every_augment_choice_turns_an_image_into_a_training_tensor() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    for augment in ("none", "basic", "trivial", "randaugment", True, False):
        transform = build_transform(32, True, augment, random_erasing=1.0, resize_size=36, interpolation="bicubic")
        for _ in range(30):  # the policies draw one of many operations per image
            x = transform(image)
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32
            assert (x == 0).flatten(1).all(0).any()  # random erasing (p=1) zeroed a rectangle of every channel
    assert "TrivialAugmentWide" in repr(build_transform(32, True, "trivial"))
    assert "RandAugment" in repr(build_transform(32, True, "randaugment"))
    assert "RandomResizedCrop" not in repr(build_transform(32, True, "none"))
    assert "RandomErasing" not in repr(build_transform(32, False, "basic", random_erasing=1.0))  # evaluation
    with pytest.raises(UserError, match="none, basic, trivial, randaugment"):
        build_transform(32, True, "autoaugment")


def test_mixup_and_cutmix_give_soft_targets_whose_rows_sum_to_one() -> None:
    torch.manual_seed(0)
    samples = [(torch.rand(3, 8, 8), k % 3) for k in range(8)]
    labels = torch.tensor([k % 3 for k in range(8)])
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0), (0.4, 1.0)):
        x, y = MixCollate(3, mixup, cutmix, mix_prob=1.0)(samples)
        assert x.shape == (8, 3, 8, 8) and y.shape == (8, 3) and y.dtype == torch.float32
        assert torch.allclose(y.sum(1), torch.ones(8)) and (y.max(1).values < 1).any()  # mixed, not one-hot
    x, y = MixCollate(3, 0.4, 1.0, mix_prob=0.0)(samples)
    assert torch.equal(y.argmax(1), labels) and torch.equal(y.max(1).values, torch.ones(8))
    assert torch.equal(x, torch.stack([s[0] for s in samples]))
    with pytest.raises(UserError, match="mix_prob"):
        MixCollate(3, 0.4, 0.0, mix_prob=1.5)


def test_balanced_sampler_draws_classes_evenly_from_an_imbalanced_fold(tmp_path: Path) -> None:
    root = write_images(tmp_path / "train", per_class=20)
    for name, keep in (("cat", 4), ("dog", 8)):
        for path in sorted((root / name).glob("*.png"))[keep:]:
            path.unlink()
    dm = FoldDataModule(str(root), 0, 2, image_size=32, batch_size=4, num_workers=0, sampler="balanced", seed=3)
    counts = dm.train_class_counts()
    assert counts.tolist() == [2, 4, 10] and counts.sum() == len(dm.indices(True))
    targets = dm.images.targets
    loader = dm.train_dataloader()
    drawn = np.concatenate([targets[dm.indices(True)[list(loader.sampler)]] for _ in range(50)])
    assert len(drawn) == 50 * 16
    assert np.abs(np.bincount(drawn, minlength=3) / len(drawn) - 1 / 3).max() < 0.05  # shuffled: 1/8, 2/8, 5/8
    again = FoldDataModule(str(root), 0, 2, image_size=32, num_workers=0, sampler="balanced", seed=3)
    assert list(again.train_dataloader().sampler) == list(dm.train_dataloader().sampler)  # seeded
    mixed = FoldDataModule(str(root), 0, 2, image_size=32, batch_size=4, num_workers=0, cutmix_alpha=1.0)
    x, y = next(iter(mixed.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 3)
    with pytest.raises(UserError, match="none, balanced"):
        FoldDataModule(str(root), 0, 2, sampler="weighted")

"""Model: backbones, head replacement, freeze semantics, weight loading, export format."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from omegaconf import DictConfig

from src import evaluation
from src.data import FoldDataModule, build_transform, load_image, scan_image_folder
from src.errors import UserError
from src.features import cached_features
from src.model import (
    ImageClassifier,
    _output_layer,
    build_network,
    digest_module,
    load_model_file,
    native_kwargs,
    native_network,
    save_model_file,
)
from src.predicting import load_model
from src.serving import Predictor
from src.tracking.identity import all_params
from src.training import model_file, train, with_resolved_data

CLASSES = ["cat", "dog", "fox"]
SIZE_WORDS = {"tiny", "small", "base", "large"}
# The smallest input each family accepts where 32 px is too small (vit and maxvit fix their image size);
# squeezenet at 64 px keeps 3x3 maps, so its head has to rebuild them from the flat features.
INPUT_SIZE = {"alexnet": 64, "inception_v3": 75, "maxvit": 224, "squeezenet": 64, "vit": 224}


def family(name: str) -> str:
    """`resnet18` -> resnet, `efficientnet_v2_s` -> efficientnet_v2, `wide_resnet50_2` -> wide_resnet."""
    kept = []
    for token in name.split("_"):
        if re.fullmatch(r"v\d", token):
            kept.append(token)
            continue
        stem = re.match(r"[a-z]*", token).group()
        if len(stem) <= 1 or stem in SIZE_WORDS:
            break
        kept.append(stem)
        if stem != token:  # a size number ends the family name
            break
    return "_".join(kept)


def cheapest_of_each_family() -> list[str]:
    """The member of every torchvision classification family with the fewest operations per image."""
    cheapest: dict[str, tuple[float, str]] = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        ops = min((w.meta.get("_ops", math.inf) for w in torchvision.models.get_model_weights(name)), default=math.inf)
        cheapest[family(name)] = min(cheapest.get(family(name), (math.inf, name)), (ops, name))
    return sorted(name for _, name in cheapest.values())


def fit_one_epoch(model: ImageClassifier, image_root: Path) -> None:
    dm = FoldDataModule(str(image_root / "train"), fold=0, n_folds=2, image_size=32, batch_size=4, num_workers=0)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_backbone_keeps_weights_and_batchnorm_stats(image_root: Path) -> None:
    torch.manual_seed(0)
    model = ImageClassifier("resnet18", CLASSES, image_size=32, freeze_backbone=True, weights=None)
    trainable, total = model.parameter_counts()
    assert trainable == 512 * 3 + 3 and total > 11_000_000
    optimizer = model.configure_optimizers()
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == trainable
    backbone, head = snapshot(model.backbone), snapshot(model.head)
    fit_one_epoch(model, image_root)
    after = model.backbone.state_dict()
    assert any("running_mean" in k for k in backbone)
    for key, value in backbone.items():  # weights *and* BN running_mean/var/num_batches_tracked
        assert torch.equal(value, after[key]), key
    assert not torch.equal(head["weight"], model.head.weight)
    model.train()
    assert not model.backbone.training and model.head.training


def test_unfrozen_backbone_trains_and_updates_batchnorm(image_root: Path) -> None:
    model = ImageClassifier("resnet18", CLASSES, image_size=32, freeze_backbone=False, weights=None)
    before = snapshot(model.backbone)
    fit_one_epoch(model, image_root)
    assert not torch.equal(before["conv1.weight"], model.backbone.conv1.weight)
    assert not torch.equal(before["bn1.running_mean"], model.backbone.bn1.running_mean)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "resnet50"])
def test_other_backbones_split_into_backbone_and_head(name: str) -> None:
    model = ImageClassifier(name, CLASSES, image_size=32, freeze_backbone=True, weights=None)
    features = model.backbone.eval()(torch.zeros(2, 3, 32, 32))
    assert features.ndim == 2 and model.head(features).shape == (2, 3)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("head.") for n in trainable)
    model.train()
    assert not any(m.training for m in model.backbone.modules())


def test_weights_load_from_a_local_file(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(num_classes=1000)
    torch.nn.init.constant_(reference.conv1.weight, 0.125)
    path = tmp_path / "resnet18-local.pth"
    torch.save(reference.state_dict(), path)
    backbone, head, attr = build_network("resnet18", 3, str(path))
    assert attr == "fc" and head.out_features == 3
    assert torch.equal(backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_weights_file_for_another_architecture_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(UserError, match="does not fit"):
        build_network("resnet18", 3, str(path))
    with pytest.raises(UserError, match="is not a file"):
        build_network("resnet18", 3, str(tmp_path / "missing.pth"))


def test_weights_that_cannot_be_downloaded_say_where_to_put_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there: the download fails at once
    with pytest.raises(UserError) as err:
        build_network("resnet18", 3, "IMAGENET1K_V1")
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path / "torch") in message
    assert "model.weights=null" in message


def test_unknown_backbone_and_weight_names_are_errors() -> None:
    with pytest.raises(UserError, match="unknown backbone 'resnet9000'"):
        build_network("resnet9000", 3, None)
    with pytest.raises(UserError, match="not a resnet18 weight set"):
        build_network("resnet18", 3, "IMAGENET_V7")


def test_exported_file_loads_with_weights_only_into_plain_torchvision(tmp_path: Path) -> None:
    model = ImageClassifier("resnet18", CLASSES, image_size=32, freeze_backbone=True, weights=None)
    path = save_model_file(tmp_path / "m.pth", model.native_state_dict(), model.model_meta())
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert saved["classes"] == CLASSES and saved["backbone"] == "resnet18" and saved["image_size"] == 32
    plain = torchvision.models.resnet18(num_classes=3)
    plain.load_state_dict(saved["state_dict"])
    net, meta = load_model_file(path)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=1e-5) and torch.allclose(plain.eval()(x), model(x), atol=1e-5)
    assert meta["classes"] == CLASSES


def test_native_network_holds_the_given_tensors_or_converts_them() -> None:
    """Built on the meta device, the network takes the state's tensors; a state in another dtype, or a network
    whose constructor needs real tensors, is built the ordinary way. All give the reference network's outputs,
    and nothing stays on meta."""
    reference = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    for state in (reference.state_dict(), {k: v.double() for k, v in reference.state_dict().items()}):
        net = native_network("resnet18", 3, state)
        tensors = [*net.parameters(), *net.buffers()]
        assert not any(t.is_meta for t in tensors) and {t.dtype for t in tensors} == {torch.float32, torch.int64}
        assert not net.training
        with torch.no_grad():
            torch.testing.assert_close(net(x), reference(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        native_network("resnet18", 3, {k: v for k, v in reference.state_dict().items() if k != "fc.bias"})
    regnet = torchvision.models.regnet_x_400mf(num_classes=3).eval()  # its constructor cannot run on meta
    with torch.no_grad():
        torch.testing.assert_close(native_network("regnet_x_400mf", 3, regnet.state_dict())(x), regnet(x))


def test_unreadable_or_foreign_checkpoints_are_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_model_file(tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch file"):
        load_model_file(tmp_path / "junk.pth")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="holds no classes"):
        load_model_file(tmp_path / "other.pth")


def test_families_are_grouped_by_name() -> None:
    names = torchvision.models.list_models(module=torchvision.models)
    assert {family(n) for n in names} >= {"resnet", "resnext", "wide_resnet", "convnext", "efficientnet_v2", "vit"}
    assert family("shufflenet_v2_x0_5") == "shufflenet_v2" and family("regnet_y_400mf") == "regnet"
    assert family("vgg11_bn") == "vgg" and family("mobilenet_v3_large") == "mobilenet_v3"


@pytest.mark.parametrize("name", cheapest_of_each_family())
def test_every_torchvision_family_trains_on_images_and_cached_features(
    name: str, image_root: Path, tmp_path: Path
) -> None:
    """One model per family, frozen: one step on images, one on cached features, the export loads into torchvision."""
    torch.manual_seed(0)
    size = INPUT_SIZE.get(family(name), 32)
    model = ImageClassifier(name, CLASSES, image_size=size, freeze_backbone=True, weights=None)
    root = image_root / "train"
    paths = [scan_image_folder(root).paths[i] for i in (0, -1)]
    targets = torch.tensor([0, len(CLASSES) - 1])
    transform = build_transform(size)
    images = torch.stack([transform(load_image(root / p)) for p in paths])
    features, computed = cached_features(model.backbone, name, root, paths, transform, tmp_path / "cache", 2, 0)
    assert computed == 2 and features.dtype == torch.float32 and features.shape[0] == 2 and features.ndim == 2

    optimizer = model.configure_optimizers()
    model.train()
    for x in (images, features):
        logits = model(x)
        loss = model.criterion(logits, targets)
        assert logits.shape == (2, len(CLASSES)) and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # The frozen backbone did not change (its digest is part of the cache key), so nothing is computed again.
    assert cached_features(model.backbone, name, root, paths, transform, tmp_path / "cache", 2, 0)[1] == 0

    # Plain torchvision, given the exported file, computes from images what the head computes from cached features.
    path = save_model_file(tmp_path / "m.pth", model.native_state_dict(), model.model_meta())
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    plain = torchvision.models.get_model(name, num_classes=len(CLASSES), **native_kwargs(name))
    plain.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(images), model.eval()(features), rtol=1e-4, atol=1e-5)


def test_googlenet_trains_unfrozen_without_auxiliary_outputs(tmp_path: Path) -> None:
    model = ImageClassifier("googlenet", CLASSES, image_size=32, freeze_backbone=False, weights=None)
    assert model.backbone.aux1 is None and model.backbone.transform_input
    assert model.train()(torch.randn(2, 3, 32, 32)).shape == (2, len(CLASSES))
    # A torchvision file with auxiliary classifiers (as the pretrained weights have) still loads as a backbone.
    reference = torchvision.models.googlenet(aux_logits=True, init_weights=False)
    torch.save(reference.state_dict(), tmp_path / "googlenet.pth")
    backbone, head, attr = build_network("googlenet", 3, str(tmp_path / "googlenet.pth"))
    assert torch.equal(backbone.conv1.conv.weight, reference.conv1.conv.weight) and head.out_features == 3


def test_a_head_without_an_output_layer_is_unsupported() -> None:
    with pytest.raises(UserError, match="backbone 'mystery' is not supported") as err:
        _output_layer(torch.nn.Sequential(torch.nn.ReLU()), "mystery")
    assert "\n" not in str(err.value)


def test_images_or_features_decide_the_path_and_anything_else_is_refused() -> None:
    model = ImageClassifier("resnet18", CLASSES, image_size=32, freeze_backbone=True, weights=None).eval()
    with pytest.raises(ValueError, match=r"\(N, D\), got a tensor of shape \(2, 512, 1\)"):
        model(torch.zeros(2, 512, 1))


def test_a_regularised_run_saves_its_preprocessing_with_the_model_and_in_the_params(
    make_cfg: Callable[..., DictConfig], image_root: Path
) -> None:
    """Soft MixUp/CutMix targets, a balanced sampler and TrivialAugment train; the resolved resize, crop and
    interpolation reach the exported file, the checkpoint and the Predictor that test.py and predict.py use."""
    cfg = make_cfg(
        *("data.resize_size=40", "data.interpolation=bicubic", "data.mean=[0.5,0.5,0.5]", "data.augment=trivial"),
        *("data.random_erasing=0.5", "data.mixup_alpha=0.4", "data.cutmix_alpha=1.0", "data.sampler=balanced"),
    )
    train(cfg)
    history = evaluation.read_csv(Path(cfg.paths.output_dir) / "history.csv")
    assert math.isfinite(history[-1]["train_loss"]) and 0 <= history[-1]["train_accuracy"] <= 1
    image = load_image(image_root / "test" / "dog" / "000.png")
    expected = build_transform(32, resize_size=40, interpolation="bicubic", mean=[0.5] * 3)(image)
    checkpoint = next(Path(cfg.paths.output_dir).rglob("*.ckpt"))
    for path in (model_file(cfg, 0), checkpoint):  # the exported file and the Lightning checkpoint
        loaded = load_model(str(path), cfg)
        meta = loaded.meta
        assert (meta["resize_size"], meta["crop_size"], meta["interpolation"]) == (40, 32, "bicubic")
        predictor = Predictor(loaded.nets, loaded.classes, loaded.preprocessing, device="cpu")
        assert torch.equal(predictor.preprocess(image), expected)
    pretrained = make_cfg("model=resnet50", "model.weights=IMAGENET1K_V2", "data.image_size=null", "data.augment=true")
    params = all_params(with_resolved_data(pretrained))  # what a fold run logs to MLflow
    assert (params["data.resize_size"], params["data.image_size"], params["data.interpolation"]) == (
        "232", "224", "bilinear"
    )  # fmt: skip
    assert params["data.augment"] == "basic"


def test_frozen_checkpoints_hold_the_head_and_refuse_another_backbone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = ImageClassifier("resnet18", ["a", "b"], 32, freeze_backbone=True)
    checkpoint = {"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)}
    trained.on_save_checkpoint(checkpoint)
    state = checkpoint["state_dict"]
    assert not any(k.startswith("backbone.") for k in state) and "head.weight" in state
    torch.save(checkpoint, tmp_path / "head.ckpt")
    net, _ = load_model_file(tmp_path / "head.ckpt")  # the random-init backbone is rebuilt from its RNG state
    assert torch.equal(net.state_dict()["layer1.0.conv1.weight"], trained.backbone.layer1[0].conv1.weight)
    torch.manual_seed(1)
    other = ImageClassifier("resnet18", ["a", "b"], 32, freeze_backbone=True)
    with pytest.raises(UserError, match="another frozen resnet18 backbone"):
        other.load_checkpoint_weights(torch.load(tmp_path / "head.ckpt", weights_only=True))


def test_a_rebuilt_network_is_the_one_a_fresh_process_would_build() -> None:
    """A sweep's jobs reuse the last network built; the copy and the RNG after it must be as a new build's."""
    import src.model

    def build(seed: int) -> tuple[list[torch.Tensor], float]:
        torch.manual_seed(seed)
        backbone, head, _ = build_network("resnet18", 3, None)
        params = [p.detach().clone() for p in [*backbone.parameters(), *head.parameters()]]
        with torch.no_grad():  # a job that trains its network must not change the next job's
            next(backbone.parameters()).add_(1.0)
        return params, float(torch.rand(1))

    src.model._last_built = None
    _, after_first = build(0)
    again, after_again = build(0)
    src.model._last_built = None
    fresh, after_fresh = build(0)
    assert after_again == after_fresh == after_first
    assert all(torch.equal(a, b) for a, b in zip(again, fresh, strict=True))
    other, _ = build(1)
    assert not torch.equal(other[0], fresh[0])


def test_a_rebuilt_frozen_backbone_reuses_its_digest_until_its_weights_change() -> None:
    """The jobs of a sweep hash their frozen backbone once; a backbone whose weights changed is hashed again."""
    import src.model

    def fresh(seed: int, frozen: bool = True) -> ImageClassifier:
        torch.manual_seed(seed)
        return ImageClassifier("resnet18", ["a", "b"], 32, freeze_backbone=frozen)

    src.model._last_built = None
    try:
        other = fresh(1).state_dict()
        digest = fresh(0).backbone_digest()
        assert list(src.model._built_digest.values()) == [digest]
        again = fresh(0)
        assert again.backbone_digest() == digest == digest_module(again.backbone)
        loaded = fresh(0)  # a whole-network checkpoint brings other backbone weights
        loaded.load_checkpoint_weights({"state_dict": other})
        assert loaded.backbone_digest() == digest_module(loaded.backbone) != digest
        trained = fresh(0, frozen=False)
        with torch.no_grad():
            next(trained.backbone.parameters()).add_(1.0)
        assert trained.backbone_digest() == digest_module(trained.backbone) != digest
    finally:
        src.model._last_built = None


def test_model_files_leave_torch_save_settings_as_they_were(tmp_path: Path) -> None:
    """Model files are written without zip checksums (torch.load never reads them); other saves keep them."""
    import zipfile

    before = torch.serialization.get_crc32_options()
    path = save_model_file(tmp_path / "m.pth", {"w": torch.arange(1000.0)}, {"classes": ["a"]})
    assert torch.serialization.get_crc32_options() == before
    assert torch.equal(torch.load(path, weights_only=True, mmap=True)["state_dict"]["w"], torch.arange(1000.0))
    assert zipfile.ZipFile(path).testzip() is not None  # the records carry no CRC32


def test_a_model_file_replaces_the_one_before_without_leftovers(tmp_path: Path) -> None:
    """src.files.replace: a new model file takes the place of the old one (moved aside, not renamed over), no
    temporary name is left, a failed rename puts the old file back, and a folder in the way stays where it is."""
    from src import files

    path = save_model_file(tmp_path / "m.pth", {"w": torch.zeros(3)}, {"classes": ["a"]})
    old = path.stat().st_ino
    save_model_file(path, {"w": torch.ones(3)}, {"classes": ["a"]})
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert path.stat().st_ino != old and [p.name for p in tmp_path.iterdir()] == ["m.pth"]
    with pytest.raises(FileNotFoundError):
        files.replace(tmp_path / "missing.pth", path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]
    (tmp_path / "folder.pth").mkdir()
    with pytest.raises(OSError):
        save_model_file(tmp_path / "folder.pth", {"w": torch.ones(3)}, {"classes": ["a"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.pth", "m.pth"] and (tmp_path / "folder.pth").is_dir()

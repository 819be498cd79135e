"""Model: backbones, head replacement, freeze semantics, weight loading, export format."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision

from src.data import FoldDataModule
from src.errors import UserError
from src.model import ImageClassifier, build_network, load_model_file, save_model_file

CLASSES = ["cat", "dog", "fox"]


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


def test_unreadable_or_foreign_checkpoints_are_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_model_file(tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch file"):
        load_model_file(tmp_path / "junk.pth")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="holds no classes"):
        load_model_file(tmp_path / "other.pth")

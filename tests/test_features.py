"""Frozen feature extractors: FeatureModel, SmallCNN training/caching, backbones, RBF features."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from inflens import Objective
from inflens.errors import InputError
from inflens.features import (
    FeatureCNNConfig,
    FeatureModel,
    SmallCNN,
    cached_feature_cnn,
    extract_features,
    pretrained_backbone,
    rbf_kernel_features,
    train_feature_cnn,
)
from inflens.fingerprint import tensors_fingerprint
from inflens.models import LogisticRegression


def _images(n: int, seed: int = 0, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_feature_model_freezes_extractor_and_selects_top() -> None:
    net = SmallCNN(features=6, widths=(4, 5))
    model = FeatureModel(net, LogisticRegression(6))
    assert all(not p.requires_grad for p in model.features.parameters())
    model.train()  # only the top layer may switch to training mode
    assert not model.features.training and model.top.training
    obj = Objective(model, "binary_logistic", l2=1e-3, params="top.")
    assert obj.p == 6 and obj.names == ["top.linear.weight"]
    x = _images(4)
    assert model(x).shape == (4,)
    torch.testing.assert_close(model(x), model.top(net(x)))


def test_small_cnn_shapes_and_errors() -> None:
    net = SmallCNN(features=7, widths=(4, 5)).eval()
    f = net(_images(3, size=16))
    assert f.shape == (3, 7) and bool((f >= 0).all())  # average-pooled ReLU maps
    with pytest.raises(InputError, match="expects images"):
        net(torch.zeros(2, 1, 8, 8))
    with pytest.raises(InputError, match="features"):
        SmallCNN(features=0)


def test_train_feature_cnn_is_deterministic_and_learns() -> None:
    torch.set_num_threads(1)
    x = _images(48, seed=1)
    y = (x[:, 0].mean((1, 2)) > 0).long()  # a learnable rule (red channel brightness)
    cfg = FeatureCNNConfig(features=8, epochs=3, batch_size=16, lr=1e-2, seed=3)
    net1, info1 = train_feature_cnn(x, y, cfg)
    net2, info2 = train_feature_cnn(x, y, cfg)
    for a, b in zip(net1.state_dict().values(), net2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert info1["history"] == info2["history"]
    assert info1["history"][-1]["loss"] < info1["history"][0]["loss"]
    assert not any(p.requires_grad for p in net1.parameters()) and not net1.training


def test_cached_feature_cnn_roundtrip(tmp_path) -> None:
    x = _images(20, seed=2)
    y = torch.arange(20) % 2
    net, info = cached_feature_cnn(x, y, tmp_path, epochs=1, batch_size=10, features=5, seed=0)
    assert info["cached"] is False
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".json", ".safetensors"]
    json.loads(next(tmp_path.glob("*.json")).read_text())
    # the cache key is the settings as given (plus the default width), as before the config
    given = {"features": 5, "epochs": 1, "batch_size": 10, "seed": 0}
    key = tensors_fingerprint(x, y, config=given, length=16)
    assert (tmp_path / f"feature_cnn-{key}.safetensors").is_file()
    net2, info2 = cached_feature_cnn(x, y, tmp_path, epochs=1, batch_size=10, features=5, seed=0)
    assert info2["cached"] is True
    torch.testing.assert_close(net(x), net2(x), rtol=0, atol=0)
    # other data or settings: a different cache entry
    _, info3 = cached_feature_cnn(x, y, tmp_path, epochs=2, batch_size=10, features=5, seed=0)
    assert info3["cached"] is False
    with pytest.raises(InputError, match="unknown settings"):
        cached_feature_cnn(x, y, tmp_path, epoch=2)


def test_feature_cnn_config_validates() -> None:
    for bad, match in [
        ({"features": 0}, "features"),
        ({"epochs": 1.5}, "epochs"),
        ({"batch_size": True}, "batch_size"),
        ({"seed": "0"}, "seed"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"augment": 1}, "augment"),
    ]:
        with pytest.raises(InputError, match=match):
            FeatureCNNConfig(**bad)
    cfg = FeatureCNNConfig(epochs=2)
    assert cfg.to_dict()["epochs"] == 2 and cfg.to_dict()["features"] == 64
    with pytest.raises(AttributeError):
        cfg.epochs = 3  # type: ignore[misc]  (frozen)
    with pytest.raises(InputError, match="FeatureCNNConfig"):
        train_feature_cnn(_images(4), torch.arange(4) % 2, {"epochs": 1})  # type: ignore[arg-type]


class _TorchvisionStyle(nn.Module):
    """A classifier laid out like torchvision's ResNet/Inception: features, pool, ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def test_pretrained_backbone_drops_head_and_normalises() -> None:
    torch.manual_seed(0)
    net = _TorchvisionStyle()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    feats = pretrained_backbone(net, "fc", mean=mean, std=std, size=12)
    x = _images(2, size=8)  # in [-1, 1]
    # by hand: [-1, 1] -> [0, 1], resize, normalise, penultimate layer
    u = (x + 1) / 2
    u = nn.functional.interpolate(u, size=(12, 12), mode="bilinear", align_corners=False)
    u = (u - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    expected = torch.flatten(net.pool(torch.relu(net.conv(u))), 1)
    torch.testing.assert_close(feats(x), expected)
    assert isinstance(net.fc, nn.Linear)  # the caller's network is not modified
    assert all(not p.requires_grad for p in feats.parameters())
    # the input gradient flows through the backbone (what the attack needs)
    model = FeatureModel(feats, LogisticRegression(4))
    xr = x.clone().requires_grad_(True)
    model(xr).sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()
    with pytest.raises(InputError, match="no attribute 'classifier'"):
        pretrained_backbone(net, "classifier")


def test_pretrained_backbone_with_torchvision() -> None:
    tv = pytest.importorskip("torchvision")
    net = tv.models.resnet18(weights=None)  # random weights: no download
    feats = pretrained_backbone(net, "fc", size=32)
    assert feats(_images(2, size=16)).shape == (2, 512)


def test_extract_features_matches_forward() -> None:
    net = SmallCNN(features=5, widths=(3, 4)).eval()
    x = _images(7)
    torch.testing.assert_close(extract_features(net, x, batch_size=3), net(x))


def test_rbf_kernel_features_reproduce_the_gram_matrix() -> None:
    g = torch.Generator().manual_seed(0)
    xtr = torch.randn(30, 3, 2, 2, generator=g, dtype=torch.float64)
    xte = torch.randn(7, 3, 2, 2, generator=g, dtype=torch.float64)
    gamma = 0.1
    ftr, fte = rbf_kernel_features(xtr, xte, gamma)
    assert ftr.shape == (30, 30) and fte.shape == (7, 30)
    a, b = xtr.reshape(30, -1), xte.reshape(7, -1)
    k_tr = torch.exp(-gamma * torch.cdist(a, a) ** 2)
    k_te = torch.exp(-gamma * torch.cdist(b, a) ** 2)
    torch.testing.assert_close(ftr @ ftr.T, k_tr, rtol=0, atol=1e-10)
    torch.testing.assert_close(fte @ ftr.T, k_te, rtol=0, atol=1e-10)
    with pytest.raises(InputError, match="gamma"):
        rbf_kernel_features(xtr, xte, 0.0)

"""Frozen feature extractors for "deep network + convex top layer" models (Sec. 5.1, 5.2).

The paper freezes Inception v3 and trains only a logistic regression on its 2,048 pooled
features. This module provides the pieces to build such a model in PyTorch:

- :class:`FeatureModel`: ``model(x) = top(features(x))`` with the feature extractor frozen.
  Pair it with ``Objective(model, "binary_logistic", l2, params="top.")``: theta is the top
  layer, while input gradients (``I_pert,loss``, eq. 5) flow through the whole network.
- :class:`SmallCNN` and :func:`train_feature_cnn` / :func:`cached_feature_cnn`: a small ReLU
  CNN for 32x32 RGB images, trained (deterministically under a seed; settings in a
  :class:`FeatureCNNConfig`) on images *other* than those of the task, then frozen. It stands in for Inception where no pretrained weights can
  be downloaded. Weights are cached as safetensors (never pickled).
- :func:`pretrained_backbone`: wraps a user's torchvision-style classifier (e.g.
  ``torchvision.models.inception_v3(weights="IMAGENET1K_V1")``) as a frozen feature extractor
  taking images in ``[-1, 1]`` (the paper's ``x / 127.5 - 1``), so the original Inception
  setting runs where its weights can be downloaded.
- :func:`extract_features`: batched, gradient-free features of a tensor of images.
- :func:`rbf_kernel_features`: exact Cholesky features of an RBF Gram matrix (PROTOCOL 4.5), the
  paper's "RBF SVM" as a linear model with ``<f(x), f(x')> = K(x, x')``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import InputError
from .fingerprint import tensors_fingerprint

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneFeatures",
    "FeatureCNNConfig",
    "FeatureModel",
    "SmallCNN",
    "cached_feature_cnn",
    "extract_features",
    "freeze",
    "pretrained_backbone",
    "rbf_kernel_features",
    "train_feature_cnn",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter and put the module in eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class FeatureModel(nn.Module):
    """A frozen feature extractor followed by a trainable top layer: ``top(features(x))``.

    Args:
        features: maps inputs ``[B, ...]`` to features ``[B, d]``; frozen here
            (``requires_grad=False``, eval mode: BatchNorm uses its running statistics).
        top: the trainable part on the features, e.g.
            ``inflens.models.LogisticRegression(d, classes=1)`` (binary LR without bias).

    Use ``Objective(model, loss, l2, params="top.")`` so that theta is the top layer only.

    Example:
        >>> from inflens.models import LogisticRegression
        >>> model = FeatureModel(SmallCNN(features=64), LogisticRegression(64))
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2])
    """

    def __init__(self, features: nn.Module, top: nn.Module) -> None:
        super().__init__()
        self.features = freeze(features)
        self.top = top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.features(x))

    def train(self, mode: bool = True) -> FeatureModel:
        """Only the top layer ever switches to training mode; the extractor stays frozen."""
        self.training = mode
        self.top.train(mode)
        self.features.eval()
        return self


# ----------------------------------------------------------------------------------- small CNN
class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-maxpool blocks: ``[B, 3, H, W] -> [B, d]``.

    Widths 32, 48 and ``features`` (default 64) with 3x3 kernels; about 12 MFLOPs per 32x32
    image, so that input gradients of many images stay cheap on a CPU.

    Args:
        features: channels of the last block.
        widths: channels of the first blocks.
        readout: ``"mean"``: average-pool the last ReLU map, ``d = features`` (how the network
            is trained, like Inception v3's pooled features); ``"flatten"``: the whole last map,
            ``d = features * (H / 8) * (W / 8)`` (1,024 values for 32x32 images). The readout
            can be changed after training (``net.readout = "flatten"``).
    """

    def __init__(
        self, features: int = 64, widths: Sequence[int] = (32, 48), readout: str = "mean"
    ) -> None:
        super().__init__()
        if int(features) < 1:
            raise InputError(f"features must be a positive integer, got {features}")
        chans = [3, *[int(w) for w in widths], int(features)]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.body = nn.Sequential(*layers)
        self.dim = int(features)
        self.readout = readout
        self.config = {"features": int(features), "widths": [int(w) for w in widths]}

    @property
    def readout(self) -> str:
        return self._readout

    @readout.setter
    def readout(self, value: str) -> None:
        if value not in ("mean", "flatten"):
            raise InputError(f"readout must be 'mean' or 'flatten', got {value!r}")
        self._readout = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise InputError(f"SmallCNN expects images [B, 3, H, W], got {tuple(x.shape)}")
        m = self.body(x)
        return m.mean(dim=(2, 3)) if self._readout == "mean" else m.flatten(1)


def _augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flips and random crops after ``pad``-pixel reflection padding."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(b, 3, h, w + 2 * pad)
    xp = xp.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(b, 3, h, w)
    return xp.gather(3, cols)


def _count(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


@dataclass(frozen=True)
class FeatureCNNConfig:
    """The settings of one :func:`train_feature_cnn` run (validated on creation).

    Attributes:
        features: channels of the last convolution (the feature dimension).
        epochs: passes over the images.
        batch_size: images per step.
        lr: AdamW's peak learning rate, decayed to 0 by a cosine over all steps.
        weight_decay: AdamW's decoupled weight decay.
        seed: seed of the initial weights, the batch order and the augmentation.
        augment: random horizontal flips and 2-pixel random crops.
    """

    features: int = 64
    epochs: int = 8
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    augment: bool = True

    def __post_init__(self) -> None:
        for name in ("features", "epochs", "batch_size"):
            value = getattr(self, name)
            if not _count(value) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        if not _count(self.seed):
            raise InputError(f"seed must be an integer, got {self.seed!r}")
        if not (isinstance(self.lr, numbers.Real) and math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a finite number > 0, got {self.lr!r}")
        wd = self.weight_decay
        if not (isinstance(wd, numbers.Real) and math.isfinite(wd) and wd >= 0):
            raise InputError(f"weight_decay must be a finite number >= 0, got {wd!r}")
        if not isinstance(self.augment, bool):
            raise InputError(f"augment must be True or False, got {self.augment!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return dataclasses.asdict(self)


def train_feature_cnn(
    x: torch.Tensor,
    y: torch.Tensor,
    config: FeatureCNNConfig | None = None,
    *,
    progress: bool = False,
) -> tuple[SmallCNN, dict[str, Any]]:
    """Train a :class:`SmallCNN` with a linear softmax classifier on ``(x, y)``; return it frozen.

    Mini-batch AdamW with a cosine learning-rate decay, random flips and crops, all randomness
    drawn from generators seeded with ``config.seed`` (deterministic for a fixed thread count).
    The classifier used for training is discarded: only the extractor is kept.

    Args:
        x: float images ``[N, 3, H, W]`` (e.g. in ``[-1, 1]``); y: integer class labels.
        config: the settings (:class:`FeatureCNNConfig`; default ``FeatureCNNConfig()``).
        progress: show a progress bar over the steps.

    Returns:
        The frozen extractor and ``info`` (epochs, final training loss and accuracy, seconds).
    """
    if config is None:
        config = FeatureCNNConfig()
    if not isinstance(config, FeatureCNNConfig):
        raise InputError(f"config must be a FeatureCNNConfig, got {type(config).__name__}")
    features, epochs, batch_size = config.features, config.epochs, config.batch_size
    lr, weight_decay, seed, augment = config.lr, config.weight_decay, config.seed, config.augment
    if x.ndim != 4 or x.shape[0] != y.shape[0]:
        raise InputError(
            f"need images [N, 3, H, W] and N labels, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    y = y.long()
    classes = int(y.max()) + 1
    torch.manual_seed(seed)  # initial weights
    net = SmallCNN(features)
    clf = nn.Linear(net.dim, classes)
    params = list(net.parameters()) + list(clf.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total) / total))
    )
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    history = []
    net.train()
    bar = tqdm(total=total, desc="Training feature CNN", disable=not progress, leave=False)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            xb = _augment(x[idx], gen) if augment else x[idx]
            logits = clf(net(xb))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * idx.numel()
            correct += int((logits.argmax(1) == y[idx]).sum())
            bar.update(1)
        history.append({"loss": loss_sum / n, "accuracy": correct / n})
        bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}")
    bar.close()
    info = {
        "epochs": epochs,
        "n_images": n,
        "classes": classes,
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "history": history,
        "train_loss": history[-1]["loss"] if history else float("nan"),
        "train_accuracy": history[-1]["accuracy"] if history else float("nan"),
    }
    return freeze(net), info


def cached_feature_cnn(
    x: torch.Tensor,
    y: torch.Tensor,
    cache_dir: str | Path,
    *,
    name: str = "feature_cnn",
    progress: bool = False,
    **train_kwargs: Any,
) -> tuple[SmallCNN, dict[str, Any]]:
    """:func:`train_feature_cnn`, cached in ``cache_dir`` under a fingerprint of data and settings.

    The weights are stored as ``<name>-<fingerprint>.safetensors`` with a JSON sidecar holding
    the training info; a later call with the same images, labels and settings loads them
    (``safetensors``, no pickle) instead of training again. ``train_kwargs`` are fields of
    :class:`FeatureCNNConfig` by name.
    """
    from safetensors.torch import load_file, save_file

    unknown = set(train_kwargs) - set(FeatureCNNConfig.__dataclass_fields__)
    if unknown:
        raise InputError(
            f"cached_feature_cnn got unknown settings {sorted(unknown)}; the settings are the "
            f"fields of FeatureCNNConfig: {sorted(FeatureCNNConfig.__dataclass_fields__)}"
        )
    # the key holds the settings as given (not every field), so existing caches stay valid
    config = {"features": 64, **train_kwargs}
    settings = FeatureCNNConfig(**config)
    key = tensors_fingerprint(x, y, config=config, length=16)
    cache_dir = Path(cache_dir).expanduser()
    weights = cache_dir / f"{name}-{key}.safetensors"
    sidecar = weights.with_suffix(".json")
    if weights.is_file() and sidecar.is_file():
        info = json.loads(sidecar.read_text())
        net = SmallCNN(**info["architecture"])
        net.load_state_dict(load_file(str(weights)))
        info["cached"] = True
        return freeze(net), info
    net, info = train_feature_cnn(x, y, settings, progress=progress)
    info["architecture"] = net.config
    info["fingerprint"] = key
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    sidecar.write_text(json.dumps(info, indent=1))
    info["cached"] = False
    return net, info


# ----------------------------------------------------------------------------------- backbones
class BackboneFeatures(nn.Module):
    """A frozen pretrained classifier without its last layer, fed images in ``value_range``.

    ``forward(x)``: map ``x`` from ``value_range`` to ``[0, 1]``, optionally resize to ``size``
    (bilinear), normalise with ``mean``/``std`` and return the backbone's output flattened to
    ``[B, d]``. Built by :func:`pretrained_backbone`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        value_range: tuple[float, float] = (-1.0, 1.0),
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        lo, hi = float(value_range[0]), float(value_range[1])
        if not hi > lo:
            raise InputError(f"value_range must be (low, high) with low < high, got {value_range}")
        self.backbone = freeze(backbone)
        self.lo, self.hi = lo, hi
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
        m = torch.tensor(mean if mean is not None else (0.0, 0.0, 0.0)).view(1, -1, 1, 1)
        s = torch.tensor(std if std is not None else (1.0, 1.0, 1.0)).view(1, -1, 1, 1)
        self.register_buffer("mean", m)
        self.register_buffer("std", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = (x - self.lo) / (self.hi - self.lo)
        if self.size is not None and tuple(u.shape[-2:]) != self.size:
            u = F.interpolate(u, size=self.size, mode="bilinear", align_corners=False)
        u = (u - self.mean.to(u.dtype)) / self.std.to(u.dtype)
        out = self.backbone(u)
        if not isinstance(out, torch.Tensor):  # e.g. torchvision InceptionOutputs in train mode
            out = out[0]
        return out.reshape(out.shape[0], -1)


def pretrained_backbone(
    net: nn.Module,
    head: str | None = "fc",
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
    size: int | tuple[int, int] | None = None,
) -> BackboneFeatures:
    """Turn a torchvision-style pretrained classifier into a frozen feature extractor.

    The attribute named ``head`` (``"fc"`` for ResNet and Inception v3, ``"classifier"`` for
    VGG/EfficientNet/MobileNet, ``"heads"`` for ViT) is replaced by ``nn.Identity`` in a copy
    of ``net``, so the output is the pooled penultimate representation (2,048 values for
    Inception v3, the paper's features). ``None`` keeps the network as it is.

    Args:
        net: the classifier, with its pretrained weights loaded.
        head: dotted attribute path of the final layer to remove.
        value_range: the range of the images you will pass (``(-1, 1)`` for this project's
            loaders, ``x / 127.5 - 1``; ``(0, 1)`` for ``ToTensor()`` images).
        mean, std: the normalisation the weights expect (ImageNet statistics by default; pass
            ``None`` for none). torchvision's Inception v3 weights expect ImageNet
            normalisation and undo it internally (``transform_input=True``).
        size: resize inputs to this size first (299 for Inception v3, 224 for most others).

    Example (needs ``torchvision`` and internet access once for the weights):
        >>> from torchvision.models import inception_v3
        >>> net = inception_v3(weights="IMAGENET1K_V1")
        >>> features = pretrained_backbone(net, "fc", size=299)      # [B, 2048] features
        >>> model = FeatureModel(features, LogisticRegression(2048))
    """
    net = copy.deepcopy(net)
    if head is not None:
        parent: nn.Module = net
        *path, last = head.split(".")
        try:
            for part in path:
                parent = getattr(parent, part)
            getattr(parent, last)
        except AttributeError as exc:
            heads = [n for n, _ in net.named_children()]
            raise InputError(
                f"the network has no attribute {head!r} to remove; its top-level children are "
                f"{heads}. Pass head=<name of the final classification layer> (or None)."
            ) from exc
        setattr(parent, last, nn.Identity())
    return BackboneFeatures(net, value_range=value_range, mean=mean, std=std, size=size)


@torch.no_grad()
def extract_features(
    extractor: nn.Module, x: torch.Tensor, batch_size: int = 256, progress: bool = False
) -> torch.Tensor:
    """``extractor(x)`` in batches, without gradients and in eval mode, as ``[N, d]``."""
    was = extractor.training
    extractor.eval()
    try:
        out = [
            extractor(x[s : s + batch_size]).reshape(min(batch_size, x.shape[0] - s), -1)
            for s in tqdm(
                range(0, x.shape[0], batch_size), desc="Features", disable=not progress, leave=False
            )
        ]
    finally:
        extractor.train(was)
    return torch.cat(out, 0)


def pull_back(
    extractor: nn.Module, x: torch.Tensor, u: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """``[m, B, *x]``: ``J(x_b)^T u[t, b]``, feature-space vectors ``u [m, B, d]`` pulled back
    to the inputs through the extractor's Jacobian at each ``x_b`` (one forward per batch of
    inputs, one backward pass per ``t``); the extractor's mode is left as it is."""
    parts = []
    for xc, uc in zip(x.split(batch_size), u.split(batch_size, dim=1)):
        xb = xc.detach().requires_grad_(True)
        with torch.enable_grad():
            fb = extractor(xb)
            grads = [torch.autograd.grad(fb, xb, v.to(fb.dtype), retain_graph=True)[0] for v in uc]
        parts.append(torch.stack(grads))
    return torch.cat(parts, 1)


# ----------------------------------------------------------------------------------- RBF kernel
def rbf_kernel_features(
    x_train: torch.Tensor,
    x_test: torch.Tensor,
    gamma: float,
    jitter: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact finite features of the RBF kernel ``K(x, x') = exp(-gamma ||x - x'||^2)`` (PROTOCOL 4.5).

    With the Gram matrix of the stacked ``[train; test]`` inputs factored as ``K = L L^T``
    (Cholesky, lower), the features are the first ``n_train`` columns of ``L``: rows of train
    give ``f_i . f_j = K(x_i, x_j)`` between training points and test rows give
    ``f_t . f_j = K(x_t, x_j)`` exactly, so a linear model on them is a kernel machine on the
    training points. Computed in float64; ``jitter`` is added to the diagonal (retried with
    growing jitter if the factorisation fails numerically).

    Returns:
        ``(f_train [n_train, n_train], f_test [n_test, n_train])`` in float64.
    """
    if not gamma > 0:
        raise InputError(f"gamma must be positive, got {gamma}")
    a = torch.cat([x_train.reshape(x_train.shape[0], -1), x_test.reshape(x_test.shape[0], -1)])
    a = a.to(torch.float64)
    sq = (a * a).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (a @ a.T)).clamp_min(0.0)
    k = torch.exp(-gamma * d2)
    n = x_train.shape[0]
    eye = torch.eye(k.shape[0], dtype=k.dtype)
    eps = float(jitter)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(k + eps * eye)
        if int(info) == 0:
            return chol[:n, :n].contiguous(), chol[n:, :n].contiguous()
        eps = max(eps * 10.0, 1e-10)
    raise InputError(
        "the RBF Gram matrix is not positive definite even with jitter "
        f"{eps:g} on the diagonal (duplicate inputs or gamma too small); raise jitter or gamma"
    )

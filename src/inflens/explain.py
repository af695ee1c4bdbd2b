"""``inflens explain``: explain a user's own model and data from files, without writing Python.

Reads a model (a safetensors state dict + a factory ``package.module:function``, a TorchScript
file, a ``torch.export`` program, a Hugging Face model folder, or a scikit-learn estimator saved
with skops) and training/test data (``.npz``, ``.csv``/``.parquet``, an image folder with one
sub-folder per class, JSON Lines text, a Hugging Face ``datasets`` folder), picks test rows,
computes ``I_up,loss(z_i, z_test)`` for every training point and writes:

- ``OUT/scores.safetensors``: ``scores [k, n_train]`` (I_up,loss; negative = helpful),
  ``test_rows [k]``, ``self_influence [n_train]`` when computed;
- ``OUT/top.csv``: the most helpful and harmful training rows of each explained test row, with
  ``predicted_loss_change = -I_up,loss / n`` (positive = removing the point raises the test loss);
- ``OUT/report/index.html``: a static report (:mod:`inflens.report`);
- ``OUT/explain.json``: settings, fingerprints, certificate numbers;
- ``OUT/influence/`` and ``OUT/scoring/``: the fitted state and the resumable score chunks that
  ``--resume`` reuses.

Nothing is ever unpickled: whole-model pickles (``torch.save(model)``, ``.pkl``, ``.joblib``,
``pytorch_model.bin``) are refused with the way to convert them.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import math
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .datasets import sha256_file
from .errors import InputError, MemoryBudgetError

CONVEX_LOSSES = ("cross_entropy", "binary_logistic", "smooth_hinge", "mse")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".ckpt", ".bin", ".npy_pickle")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SELECTIONS = ("misclassified", "highest-loss")
SOLVERS = ("auto", "exact", "cg", "pcg", "lissa", "arnoldi", "kfac", "ekfac")
CERTIFICATES = ("auto", "loo", "solvers", "none")
#: largest p for which solver="auto" forms the explicit Hessian
AUTO_EXACT_MAX_P = 2000


# ---------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ExplainConfig:
    """What ``inflens explain`` reads, computes and writes (validated on construction).

    Attributes:
        model, train, test: paths of the model and of the training and test data.
        out: output folder.
        factory: ``package.module:function`` building the architecture of a safetensors
            state dict; ``factory_kwargs``: JSON object of keyword arguments for it.
        x_key, y_key: array names in ``.npz`` files.
        target: target column of ``.csv``/``.parquet``/datasets tables; ``features``: the
            feature columns (default: all others).
        image_shape: shape to show flat inputs as images (e.g. ``(8, 8)``).
        image_size: ``(H, W)`` to resize the images of an image folder to.
        text_field, label_field, max_length: JSON Lines / datasets text fields and truncation.
        rows, rows_file, select, count: which test rows to explain.
        solver, damping, l2, loss, curvature, params, max_memory_gb: the influence settings.
        resume: reuse ``OUT/influence`` and finished score chunks of an earlier run.
        top: helpful and harmful training rows shown per test row.
        outliers: self-influence outliers to list (0: none).
        certificate, certificate_k: accuracy check (``auto``, ``loo``, ``solvers``, ``none``)
            and how many points it checks.
        device: torch device of the model.
        progress: progress on the terminal.
        title: report title.
    """

    model: str
    train: str
    test: str
    out: str
    factory: str | None = None
    factory_kwargs: str = "{}"
    x_key: str = "X"
    y_key: str = "y"
    target: str | None = None
    features: tuple[str, ...] | None = None
    image_shape: tuple[int, ...] | None = None
    image_size: tuple[int, int] | None = None
    text_field: str = "text"
    label_field: str = "label"
    max_length: int = 128
    rows: tuple[int, ...] | None = None
    rows_file: str | None = None
    select: str = "misclassified"
    count: int = 3
    solver: str = "auto"
    damping: float = 0.0
    l2: float = 0.0
    loss: str | None = None
    curvature: str = "hessian"
    params: tuple[str, ...] | None = None
    max_memory_gb: float = 4.0
    resume: bool = False
    top: int = 5
    outliers: int = 10
    certificate: str = "auto"
    certificate_k: int = 10
    device: str = "cpu"
    progress: bool = True
    title: str | None = None

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise InputError(
                f"--select must be one of {', '.join(SELECTIONS)}, got {self.select!r}"
            )
        if self.solver not in SOLVERS:
            raise InputError(f"--solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.certificate not in CERTIFICATES:
            raise InputError(
                f"--certificate must be one of {', '.join(CERTIFICATES)}, got {self.certificate!r}"
            )
        if self.curvature not in ("hessian", "ggn"):
            raise InputError(f"--curvature must be 'hessian' or 'ggn', got {self.curvature!r}")
        for name in ("count", "top", "max_length", "certificate_k"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1")
        if self.outliers < 0:
            raise InputError("--outliers must be 0 or more")
        for name in ("damping", "l2"):
            if not float(getattr(self, name)) >= 0.0:
                raise InputError(f"--{name} must be a non-negative number")
        if not self.max_memory_gb > 0:
            raise InputError("--max-memory-gb must be positive")
        if self.rows is not None and self.rows_file is not None:
            raise InputError("give either --rows or --rows-file, not both")
        try:
            kwargs = json.loads(self.factory_kwargs)
        except json.JSONDecodeError as exc:
            raise InputError(f"--factory-kwargs is not valid JSON: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise InputError("--factory-kwargs must be a JSON object, e.g. '{\"hidden\": 32}'")


# ---------------------------------------------------------------------------- progress
class _Log:
    def __init__(self, on: bool) -> None:
        self.on = on
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.on:
            print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- model adapters
class TokenClassifier(nn.Module):
    """A Hugging Face model on inputs ``x [B, 2, T]`` = (input ids, attention mask) -> logits.

    The attention mask is passed as an additive 4-D float mask (``0`` where attended, the
    dtype's minimum elsewhere; causal for language models), which transformers uses as-is: its
    own mask construction inspects the mask's values in Python (``mask.all()``), which
    ``torch.func.vmap`` cannot run per example.
    """

    def __init__(self, model: nn.Module, causal: bool) -> None:
        super().__init__()
        self.model = model
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, keep = x[:, 0], x[:, 1].bool()
        allowed = keep[:, None, None, :]
        if self.causal:
            t = ids.shape[-1]
            allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=ids.device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
        return self.model(input_ids=ids, attention_mask=mask).logits


class ScriptedModel(nn.Module):
    """A TorchScript module with its parameters held by this (eager) module.

    ``torch.func.functional_call`` refuses jitted modules, so the parameters live here and are
    written into the scripted module before each call; names have ``.`` replaced by ``__``.
    """

    def __init__(self, scripted: torch.jit.ScriptModule) -> None:
        super().__init__()
        self._scripted = [scripted.eval()]  # a list: not a child, so .eval()/.train() skip it
        self._names = [n for n, _ in scripted.named_parameters()]
        for n, p in scripted.named_parameters():
            self.register_parameter(n.replace(".", "__"), nn.Parameter(p.detach().clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sm = self._scripted[0]
        for n in self._names:
            *path, leaf = n.split(".")
            mod = sm
            for part in path:
                mod = getattr(mod, part)
            setattr(mod, leaf, getattr(self, n.replace(".", "__")))
        return sm(x)


class ExportedModel(nn.Module):
    """A ``torch.export`` program's module; its train/eval behaviour was fixed at export time."""

    def __init__(self, program_module: nn.Module) -> None:
        super().__init__()
        self.program = program_module

    def train(self, mode: bool = True) -> ExportedModel:
        # the exported graph rejects .train()/.eval(); its mode is baked in
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


@dataclass
class LoadedModel:
    """A model read from disk and how to address its parameters."""

    kind: str
    module: nn.Module | None = None
    prefix: Callable[[str], str] = lambda s: s
    tokenizer: Any = None
    estimator: Any = None
    causal: bool = False
    class_names: list[str] | None = None
    files: list[Path] = field(default_factory=list)
    description: str = ""


def _refuse_pickle(path: Path, what: str) -> InputError:
    return InputError(
        f"{path} is {what}: loading it would unpickle arbitrary Python objects, which can run "
        "any code. Save the weights with safetensors instead (safetensors.torch.save_file("
        "model.state_dict(), 'model.safetensors')) and pass --factory package.module:function "
        "that builds the architecture; or save TorchScript (torch.jit.script(model).save(...)), "
        "a torch.export program (torch.export.save(...)), a Hugging Face folder "
        "(save_pretrained), or a scikit-learn estimator with skops (skops.io.dump)"
    )


def import_factory(spec: str) -> Callable[..., Any]:
    """The callable named ``package.module:function`` (``module.Class`` attributes allowed)."""
    if ":" not in spec:
        raise InputError(f"--factory must look like package.module:function, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # console scripts do not put the working folder on the path
    mod_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        raise InputError(
            f"cannot import module {mod_name!r} of --factory {spec!r} ({exc}); make it "
            "importable (pip install your package, or run from its folder / set PYTHONPATH)"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"module {mod_name!r} has no attribute {attr!r} (--factory {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"--factory {spec!r} is not callable")
    return obj


def _load_state_dict_model(path: Path, factory: str | None, kwargs: dict[str, Any]) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if factory is None:
        meta = path.parent / "inflens_model.json"
        if meta.is_file():
            factory = json.loads(meta.read_text()).get("factory")
            kwargs = {**json.loads(meta.read_text()).get("factory_kwargs", {}), **kwargs}
    if not factory:
        raise InputError(
            f"{path} holds only weights; pass --factory package.module:function that builds the "
            "model (it is called, then load_state_dict(strict=True) fills in the weights)"
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path} is not a readable safetensors file ({exc})") from exc
    model = import_factory(factory)(**kwargs)
    if not isinstance(model, nn.Module):
        raise InputError(
            f"--factory {factory} returned {type(model).__name__}, not a torch.nn.Module"
        )
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(floats) == 1:
        model = model.to(floats.pop())  # keep the dtype the weights were trained in
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(
            f"the weights in {path} do not fit the model built by {factory}: missing "
            f"{list(result.missing_keys)[:8]}, unexpected {list(result.unexpected_keys)[:8]}"
        )
    return LoadedModel(
        "safetensors", model.eval(), files=[path], description=f"{path.name} + {factory}"
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def _load_hf_folder(path: Path, config: dict[str, Any]) -> LoadedModel:
    try:
        import transformers
    except ImportError as exc:
        raise InputError(
            f"{path} is a Hugging Face model folder; reading it needs transformers: "
            "pip install transformers"
        ) from exc
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise _refuse_pickle(path / "pytorch_model.bin", "a pickled Hugging Face checkpoint")
        raise InputError(f"{path} has config.json but no *.safetensors weights")
    archs = config.get("architectures") or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    auto = (
        transformers.AutoModelForCausalLM
        if causal
        else transformers.AutoModelForSequenceClassification
    )
    model = auto.from_pretrained(
        str(path), local_files_only=True, use_safetensors=True, attn_implementation="eager"
    )
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a model without a tokenizer can still take pre-tokenised data
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    names = None
    id2label = getattr(model.config, "id2label", None)
    if not causal and id2label and len(id2label) == model.config.num_labels:
        names = [str(id2label[i]) for i in range(len(id2label))]
    return LoadedModel(
        "hf-causal-lm" if causal else "hf-classifier",
        TokenClassifier(model.eval(), causal),
        prefix=lambda s: "model." + s,
        tokenizer=tokenizer,
        causal=causal,
        class_names=names,
        files=sorted(path.glob("*.safetensors")) + [path / "config.json"],
        description=f"Hugging Face {type(model).__name__} from {path}",
    )


def _load_skops(path: Path) -> LoadedModel:
    try:
        import skops.io as sio
    except ImportError as exc:
        raise InputError(
            f"{path} is a skops file; reading it needs skops: pip install skops"
        ) from exc
    try:
        untrusted = sio.get_untrusted_types(file=str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure means an unreadable file
        raise InputError(f"{path} is not a readable skops file ({exc})") from exc
    # trust scikit-learn's and numpy's own types (skops rebuilds them from their state without
    # running pickled code); anything else must be vetted by the user
    refused = [t for t in untrusted if not t.startswith(("sklearn.", "numpy.", "scipy.sparse."))]
    if refused:
        raise InputError(
            f"{path} contains types outside scikit-learn/numpy that inflens will not trust: "
            f"{', '.join(refused)}. If you trust the file, load it yourself with "
            "skops.io.load(path, trusted=[...]) and call inflens.from_sklearn(estimator, X, y)"
        )
    est = sio.load(str(path), trusted=list(untrusted))
    names = [str(c) for c in est.classes_] if hasattr(est, "classes_") else None
    return LoadedModel(
        "sklearn",
        estimator=est,
        class_names=names,
        files=[path],
        description=f"scikit-learn {type(est).__name__} from {path.name}",
    )


def load_model(
    path: str | Path, factory: str | None = None, factory_kwargs: str = "{}"
) -> LoadedModel:
    """Read a model from ``path`` without unpickling anything (see the module docstring)."""
    path = Path(path)
    kwargs = json.loads(factory_kwargs or "{}")
    if not path.exists():
        raise InputError(f"model {path} does not exist")
    if path.is_dir():
        if (path / "inflens_model.json").is_file():
            meta = json.loads((path / "inflens_model.json").read_text())
            weights = path / meta.get("weights", "model.safetensors")
            return _load_state_dict_model(weights, factory, kwargs)
        if (path / "config.json").is_file():
            return _load_hf_folder(path, json.loads((path / "config.json").read_text()))
        raise InputError(
            f"model folder {path} has neither config.json (a Hugging Face folder) nor "
            "inflens_model.json (written by inflens.callbacks.save_for_inflens)"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_state_dict_model(path, factory, kwargs)
    if suffix == ".pt2":
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001 - report any load failure as bad input
            raise InputError(f"{path} is not a readable torch.export program ({exc})") from exc
        return LoadedModel(
            "torch.export",
            ExportedModel(program.module()),
            prefix=lambda s: "program." + s,
            files=[path],
            description=f"torch.export program {path.name}",
        )
    if suffix in (".pt", ".pth", ".jit", ".ts", ".torchscript"):
        if _is_torchscript(path):
            scripted = torch.jit.load(str(path), map_location="cpu")
            return LoadedModel(
                "torchscript",
                ScriptedModel(scripted),
                prefix=lambda s: s.replace(".", "__"),
                files=[path],
                description=f"TorchScript {path.name}",
            )
        raise _refuse_pickle(path, "a torch.save pickle (a whole model or a pickled state dict)")
    if suffix == ".skops":
        return _load_skops(path)
    if suffix in PICKLE_SUFFIXES:
        raise _refuse_pickle(path, "a pickle file")
    raise InputError(
        f"unknown model format {path.name!r}; use model.safetensors + --factory, TorchScript "
        "(.pt), torch.export (.pt2), a Hugging Face folder, or a skops file (.skops)"
    )


# ---------------------------------------------------------------------------- data
@dataclass
class Table:
    """Inputs and targets read from disk, plus what is needed to show each example."""

    x: torch.Tensor
    y: torch.Tensor
    kind: str  # "image", "text" or "table"
    source: Path
    feature_names: list[str] | None = None
    image_shape: tuple[int, ...] | None = None
    tokens: list[list[str]] | None = None
    positions: list[list[int]] | None = None  # token positions shown (attention mask == 1)
    label_map: dict[Any, int] | None = None
    class_names: list[str] | None = None
    value_range: tuple[float, float] = (0.0, 1.0)

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class DataOptions:
    """How to read a data file (see :class:`ExplainConfig`)."""

    x_key: str = "X"
    y_key: str = "y"
    target: str | None = None
    features: tuple[str, ...] | None = None
    image_shape: tuple[int, ...] | None = None
    image_size: tuple[int, int] | None = None
    text_field: str = "text"
    label_field: str = "label"
    max_length: int = 128


def _labels(values: Sequence[Any], label_map: dict[Any, int] | None, what: str):
    """Integer class indices for non-numeric labels (classes sorted; test uses train's map)."""
    arr = np.asarray(values)
    if arr.dtype.kind in "biuf" and label_map is None:
        return arr, None
    if label_map is None:
        label_map = {v: i for i, v in enumerate(sorted(set(arr.tolist()), key=str))}
    unknown = sorted({v for v in arr.tolist() if v not in label_map}, key=str)
    if unknown:
        raise InputError(
            f"{what} has labels the training data does not: {unknown[:8]} "
            f"(known: {list(label_map)[:12]})"
        )
    return np.asarray([label_map[v] for v in arr.tolist()]), label_map


def _target_tensor(y: np.ndarray) -> torch.Tensor:
    y = np.asarray(y)
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)) and y.ndim == 1:
        return torch.from_numpy(y.astype(np.int64))  # integral floats from CSV are classes
    if y.dtype.kind in "biu":
        return torch.from_numpy(y.astype(np.int64))
    return torch.from_numpy(y.astype(np.float64))


def _read_npz(path: Path, opt: DataOptions) -> Table:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            missing = [k for k in (opt.x_key, opt.y_key) if k not in keys]
            if missing:
                raise InputError(
                    f"{path} has no array named {missing[0]!r}; it has {keys}. Name them with "
                    "--x-key and --y-key"
                )
            x, y = z[opt.x_key], z[opt.y_key]
            shape = tuple(int(v) for v in z["image_shape"]) if "image_shape" in keys else None
    except ValueError as exc:  # object arrays need pickle: refused
        raise InputError(f"{path} cannot be read without unpickling ({exc})") from exc
    if x.shape[0] != y.shape[0]:
        raise InputError(
            f"{path}: {opt.x_key} has {x.shape[0]} rows but {opt.y_key} has {y.shape[0]}"
        )
    if x.dtype.kind not in "biuf":
        raise InputError(f"{path}: {opt.x_key} must be numeric, got dtype {x.dtype}")
    shape = opt.image_shape or shape
    kind = "image" if shape is not None or x.ndim in (3, 4) else "table"
    names = [f"x{j}" for j in range(int(np.prod(x.shape[1:])))] if kind == "table" else None
    xt = torch.from_numpy(np.ascontiguousarray(x))
    return Table(xt, _target_tensor(y), kind, path, names, shape, value_range=_range(x))


def _range(x: np.ndarray) -> tuple[float, float]:
    return (float(np.min(x)), float(np.max(x))) if x.size else (0.0, 1.0)


def _frame_table(df: Any, path: Path, opt: DataOptions, label_map) -> Table:
    if not opt.target:
        raise InputError(f"{path} is a table: name its target column with --target COLUMN")
    cols = [str(c) for c in df.columns]
    if opt.target not in cols:
        raise InputError(f"{path} has no column {opt.target!r}; its columns are {cols}")
    feats = list(opt.features) if opt.features else [c for c in cols if c != opt.target]
    missing = [c for c in feats if c not in cols]
    if missing:
        raise InputError(f"{path} has no column(s) {missing}; its columns are {cols}")
    non_numeric = [c for c in feats if df[c].dtype.kind not in "biuf"]
    if non_numeric:
        raise InputError(
            f"{path}: feature column(s) {non_numeric} are not numeric; encode them first "
            "(e.g. one-hot) or leave them out with --features"
        )
    x = np.array(
        df[feats].to_numpy(dtype=np.float64), copy=True
    )  # pandas may hand a read-only view
    y, label_map = _labels(df[opt.target].to_numpy(), label_map, str(path))
    names = sorted(label_map, key=lambda k: label_map[k]) if label_map else None
    return Table(
        torch.from_numpy(x),
        _target_tensor(y),
        "table",
        path,
        feats,
        label_map=label_map,
        class_names=[str(n) for n in names] if names else None,
        value_range=_range(x),
    )


def _read_image_folder(path: Path, opt: DataOptions, label_map) -> Table:
    from PIL import Image

    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise InputError(f"image folder {path} needs one sub-folder per class")
    if label_map is None:
        label_map = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in classes if c not in label_map]
    if unknown:
        raise InputError(f"{path} has class folders the training data does not: {unknown}")
    files = [
        (f, label_map[c])
        for c in classes
        for f in sorted((path / c).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    modes = []
    for f, _ in files:  # header only; each file is closed again (big folders, few handles)
        with Image.open(f) as im:
            modes.append(im.mode)
    gray = all(m in ("L", "1", "I", "I;16", "F") for m in modes)
    arrays = []
    for f, _ in files:
        with Image.open(f) as im:
            im = im.convert("L" if gray else "RGB")
            if opt.image_size:
                im = im.resize((opt.image_size[1], opt.image_size[0]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.float64) / 255.0
        arrays.append(a[None] if gray else np.moveaxis(a, -1, 0))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise InputError(
            f"the images under {path} have different sizes {sorted(shapes)[:4]}; pass "
            "--image-size H,W to resize them"
        )
    x = np.stack(arrays)
    y = np.asarray([lab for _, lab in files])
    names = sorted(label_map, key=lambda k: label_map[k])
    return Table(
        torch.from_numpy(x),
        torch.from_numpy(y).long(),
        "image",
        path,
        label_map=label_map,
        class_names=names,
        value_range=(0.0, 1.0),
    )


def _tokenise(
    texts: list[str], labels: list[Any] | None, path: Path, opt: DataOptions, model: LoadedModel,
    label_map,
) -> Table:  # fmt: skip
    tok = model.tokenizer
    if tok is None:
        raise InputError(
            f"{path} holds text; it needs the tokenizer saved in the model folder "
            "(tokenizer.save_pretrained(folder)) and a Hugging Face model folder as --model"
        )
    enc = tok(texts, padding="longest", truncation=True, max_length=opt.max_length,
              return_tensors="pt")  # fmt: skip
    ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()
    x = torch.stack([ids, mask], 1)
    positions = [m.nonzero()[:, 0].tolist() for m in mask]
    tokens = [tok.convert_ids_to_tokens(ids[i, pos].tolist()) for i, pos in enumerate(positions)]
    names = None
    if model.causal:
        y = ids.masked_fill(mask == 0, -100)
    else:
        if labels is None:
            raise InputError(f"{path} needs a {opt.label_field!r} field for a classifier")
        if label_map is None and model.class_names and np.asarray(labels).dtype.kind not in "biu":
            label_map = {n: i for i, n in enumerate(model.class_names)}
        y_np, label_map = _labels(labels, label_map, str(path))
        y = torch.from_numpy(np.asarray(y_np)).long()
        names = sorted(label_map, key=lambda k: label_map[k]) if label_map else model.class_names
    return Table(x, y, "text", path, tokens=tokens, positions=positions, label_map=label_map,
                 class_names=[str(n) for n in names] if names else None)  # fmt: skip


def _read_jsonl(path: Path, opt: DataOptions, model: LoadedModel, label_map) -> Table:
    texts, labels = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {i + 1} is not JSON ({exc})") from exc
        if opt.text_field not in rec:
            raise InputError(
                f"{path} line {i + 1} has no {opt.text_field!r} field (fields: {sorted(rec)}); "
                "name it with --text-field"
            )
        texts.append(str(rec[opt.text_field]))
        if not model.causal:
            if opt.label_field not in rec:
                raise InputError(
                    f"{path} line {i + 1} has no {opt.label_field!r} field; name it with "
                    "--label-field"
                )
            labels.append(rec[opt.label_field])
    if not texts:
        raise InputError(f"{path} holds no records")
    return _tokenise(texts, None if model.causal else labels, path, opt, model, label_map)


def _read_hf_dataset(path: Path, opt: DataOptions, model: LoadedModel, label_map, split: str):
    try:
        import datasets
    except ImportError as exc:
        raise InputError(
            f"{path} is a Hugging Face datasets folder; reading it needs the datasets package: "
            "pip install datasets"
        ) from exc
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"{path} has splits {list(ds)}, not {split!r}")
        ds = ds[split]
    cols = list(ds.column_names)
    if opt.text_field in cols:
        labels = None if model.causal else ds[opt.label_field] if opt.label_field in cols else None
        if not model.causal and labels is None:
            raise InputError(f"{path} has no {opt.label_field!r} column; columns: {cols}")
        return _tokenise(list(ds[opt.text_field]), labels, path, opt, model, label_map)
    if opt.target is None and "image" in cols and opt.label_field in cols:
        imgs = [np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 for im in ds["image"]]
        x = np.stack([np.moveaxis(a, -1, 0) for a in imgs])
        y, label_map = _labels(ds[opt.label_field], label_map, str(path))
        return Table(torch.from_numpy(x), torch.from_numpy(np.asarray(y)).long(), "image", path,
                     label_map=label_map)  # fmt: skip
    return _frame_table(ds.to_pandas(), path, opt, label_map)


def load_data(
    path: str | Path,
    opt: DataOptions,
    model: LoadedModel,
    label_map: dict[Any, int] | None = None,
    split: str = "train",
) -> Table:
    """Read one data set (see the module docstring); ``label_map`` maps test labels as train's."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"data {path} does not exist")
    if path.is_dir():
        if any(
            (path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
        ):
            return _read_hf_dataset(path, opt, model, label_map, split)
        return _read_image_folder(path, opt, label_map)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path, opt)
    if suffix in (".csv", ".tsv"):
        import pandas as pd

        return _frame_table(pd.read_csv(path, sep="\t" if suffix == ".tsv" else ","), path, opt,
                            label_map)  # fmt: skip
    if suffix in (".parquet", ".pq"):
        import pandas as pd

        try:
            df = pd.read_parquet(path)
        except ImportError as exc:
            raise InputError(f"reading {path} needs pyarrow: pip install pyarrow ({exc})") from exc
        return _frame_table(df, path, opt, label_map)
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path, opt, model, label_map)
    if suffix in (".pt", ".pth", *PICKLE_SUFFIXES):
        raise _refuse_pickle(path, "a pickle file (data)")
    raise InputError(
        f"unknown data format {path.name!r}; use .npz, .csv, .parquet, .jsonl, an image folder "
        "(one sub-folder per class) or a Hugging Face datasets folder"
    )


# ---------------------------------------------------------------------------- selection
def _forward_all(obj: Any, x: torch.Tensor, y: torch.Tensor, chunk: int = 512):
    """Model outputs and per-example losses for every row (no gradients), checking targets."""
    from .losses import check_targets

    outs, losses = [], []
    with torch.no_grad(), obj.evaluating():
        for lo in range(0, x.shape[0], chunk):
            xb, yb = obj.prepare(x[lo : lo + chunk], y[lo : lo + chunk], "test data", lo)
            out = obj.outputs(obj.theta, xb)
            if obj.builtin_loss:
                try:
                    check_targets(obj.loss_name, out, yb)
                except InputError as exc:
                    raise InputError(f"test data rows {lo}-{lo + len(xb) - 1}: {exc}") from exc
            outs.append(out.cpu())
            m = obj.loss_fn(out, yb) if obj.measurement is None else obj.measurement(out, yb)
            losses.append(m.cpu())
    return torch.cat(outs), torch.cat(losses)


def predicted_labels(loss_name: str, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """Predicted classes for classification losses (``None`` for regression / language models)."""
    if loss_name == "cross_entropy" and outputs.ndim == 2:
        return outputs.argmax(1)
    if loss_name in ("binary_logistic", "hinge", "smooth_hinge"):
        s = outputs.reshape(-1)
        neg = -1 if bool((y == -1).any()) else 0
        return torch.where(s > 0, torch.ones_like(s), torch.full_like(s, neg)).long()
    return None


def read_rows_file(path: str | Path) -> list[int]:
    """Integers separated by commas, spaces or new lines; ``#`` starts a comment."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--rows-file {path} does not exist")
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0]
        for tok in line.replace(",", " ").split():
            try:
                out.append(int(tok))
            except ValueError as exc:
                raise InputError(f"--rows-file {path}: {tok!r} is not a row number") from exc
    if not out:
        raise InputError(f"--rows-file {path} lists no rows")
    return out


def choose_rows(
    cfg: ExplainConfig, n_test: int, losses: torch.Tensor, wrong: torch.Tensor | None
) -> tuple[list[int], str]:
    """The test rows to explain and a sentence saying how they were chosen."""
    if cfg.rows is not None or cfg.rows_file is not None:
        rows = list(cfg.rows) if cfg.rows is not None else read_rows_file(cfg.rows_file)
        bad = [r for r in rows if not 0 <= r < n_test]
        if bad:
            raise InputError(f"test rows {bad[:8]} are outside [0, {n_test - 1}]")
        return list(dict.fromkeys(rows)), "rows given on the command line"
    order = torch.argsort(losses, descending=True)
    if cfg.select == "misclassified":
        if wrong is None:
            raise InputError("--select misclassified needs a classifier; use --select highest-loss")
        missed = order[wrong[order]]
        if missed.numel():
            rows = missed[: cfg.count].tolist()
            return rows, f"the {len(rows)} misclassified test rows with the highest loss"
        rows = order[: cfg.count].tolist()
        return rows, "no test row is misclassified: the rows with the highest loss"
    rows = order[: cfg.count].tolist()
    return rows, f"the {len(rows)} test rows with the highest loss"


# ---------------------------------------------------------------------------- influence
def _solver(cfg: ExplainConfig, p: int):
    from .solvers import Exact, make_solver

    name = cfg.solver
    if name == "auto":
        name = "exact" if p <= AUTO_EXACT_MAX_P else "cg"
    if name == "exact":
        return Exact(max_memory_gb=cfg.max_memory_gb)
    return make_solver(name)


def _raw_labels(table: Table) -> np.ndarray:
    """The labels as they were in the file (strings are mapped back from class indices)."""
    if table.label_map is None:
        return table.y.numpy()
    inv = {i: v for v, i in table.label_map.items()}
    return np.asarray([inv[int(i)] for i in table.y.tolist()])


def _sklearn_influence(model: LoadedModel, train: Table, cfg: ExplainConfig, solver: Any = None):
    try:
        from .sklearn_bridge import from_sklearn
    except ImportError as exc:
        raise InputError(f"scikit-learn models need inflens.sklearn_bridge ({exc})") from exc
    # the bridge takes the estimator's own label values (strings, {3, 7}, ...)
    options: dict[str, Any] = {"damping": cfg.damping, "progress": cfg.progress}
    if solver is not None or cfg.solver != "auto":
        options["solver"] = solver if solver is not None else cfg.solver
    return from_sklearn(model.estimator, train.x.numpy(), _raw_labels(train), **options)


def _probe(model: LoadedModel, module: nn.Module, x: torch.Tensor) -> None:
    """Run the model on one and on two training rows: a shape mismatch becomes an InputError."""
    device = next(module.parameters()).device
    for k in (2, 1):
        xb = x[:k].to(device)
        try:
            with torch.no_grad():
                module.eval()(xb)
        except Exception as exc:  # noqa: BLE001 - any failure here is a mismatch with the data
            hint = ""
            if model.kind == "torch.export":
                hint = (
                    "; a torch.export program runs only on the shapes it was exported for: "
                    "export with a dynamic batch dimension, dynamic_shapes=({0: "
                    "torch.export.Dim('batch')},)"
                )
            msg = " ".join(str(exc).split())[:300]
            raise InputError(
                f"the model could not process training inputs of shape {tuple(xb.shape)} "
                f"({type(exc).__name__}: {msg}){hint}"
            ) from exc


def _default_loss(model: LoadedModel, y: torch.Tensor) -> str | Callable:
    if model.causal:
        return "causal_lm"  # mean next-token cross-entropy over the non-padding tokens
    return "cross_entropy" if not y.is_floating_point() else "mse"


def _retrain(inf: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Exact leave-one-out refit of the mean risk over the kept points with the same l2:
    chord-Newton steps preconditioned by the exact H^-1 at theta-hat (as the demo), or L-BFGS."""
    from .train import fit_lbfgs, fit_newton, loo_weights

    obj, n = inf.objective, inf.n
    x, y = inf.train.get(torch.arange(n))
    exact = inf.solver.name == "exact" and inf.damping == 0 and inf.curvature == "hessian"

    def refit(keep: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
        w = None if bool(keep.all()) else loo_weights(n, ~keep, obj.dtype)
        if exact:
            res = fit_newton(obj, (x, y), inf.solver.solve, theta0, w, tol=1e-12)
        else:
            res = fit_lbfgs(obj, (x, y), theta0, w, tol=1e-10)
        return res.theta if hasattr(res, "theta") else res[0]

    return refit


def _certificate(
    inf: Any,
    test_one: Any,
    main_row: torch.Tensor,
    cfg: ExplainConfig,
    log: Callable[[str], None],
    rebuild: Callable[[Any], Any],
    loo_ok: bool = True,
):
    """An accuracy check of the first explained row: LOO refits or a second solver.

    ``rebuild(solver)`` returns the same Influence fitted with another solver."""
    from .report import Certificate
    from .solvers import CG, Exact
    from .validate import LOOConfig, correlations, leave_one_out

    obj = inf.objective
    n = inf.n
    method = cfg.certificate
    if method == "none":
        return None, {}
    convex = obj.builtin_loss and obj.loss_name in CONVEX_LOSSES
    # a single Linear layer under a convex loss: the risk is convex and an L-BFGS refit exact
    owners = [m for m in obj.model.modules() if any(True for _ in m.parameters(recurse=False))]
    head = loo_ok and convex and len(owners) == 1 and isinstance(owners[0], nn.Linear) or None
    if method == "auto":
        method = "loo" if head is not None and n <= 20000 else "solvers"
    pred_row = -main_row / n
    if method == "loo":
        log(
            f"certificate: {cfg.certificate_k} leave-one-out refits (L-BFGS, exact for a convex model)"
        )
        try:
            loo = LOOConfig(k=cfg.certificate_k, select="top", retrain=_retrain(inf),
                            progress=cfg.progress)  # fmt: skip
            res = leave_one_out(inf, test_one, loo, predicted=pred_row)
        except Exception as exc:  # noqa: BLE001 - the report states why the check is missing
            note = f"the leave-one-out check failed ({type(exc).__name__}: {exc})"
            return Certificate(method="leave-one-out refits", note=note), {"error": note}
        rows = tuple(
            (f"train row {int(i)}", float(a), float(p_))
            for i, a, p_ in zip(res.indices.tolist(), res.actual.tolist(), res.predicted.tolist())
        )
        c = correlations(res.actual, res.predicted)
        note = "" if head is not None else (
            "the model is not a single linear layer on fixed features: a refit of a non-convex "
            "model may land in another minimum")  # fmt: skip
        cert = Certificate(
            method=(
                f"Leave-one-out: each of the {len(rows)} training rows with the largest "
                f"|predicted change| for test row shown first was removed and the model refit "
                f"to a gradient norm <= 1e-10; predicted = -I_up,loss/n, actual = measured "
                f"change of the test loss. Slope of predicted on actual: {c['slope']:.4f}."
            ),
            pearson=c["pearson"], spearman=c["spearman"], n_points=len(rows), rows=rows,
            columns=("actual change (refit)", "predicted change"), note=note,
        )  # fmt: skip
        return cert, {"method": "loo", **c, "indices": res.indices.tolist(),
                      "actual": res.actual.tolist(), "predicted": res.predicted.tolist()}  # fmt: skip
    main_name = inf.solver.name
    if main_name == "exact":
        other = CG(tol=1e-10, max_iter=1000)
    elif obj.p <= AUTO_EXACT_MAX_P:
        other = Exact(max_memory_gb=cfg.max_memory_gb)
    else:  # p too large for Exact: CG with a tighter tolerance than the default
        other = CG(tol=1e-10, max_iter=1000)
    log(f"certificate: {main_name} against {other.name} on all {n} training points")
    try:
        other_row = rebuild(other).loss_influence(test_one)[0].cpu()
    except (MemoryBudgetError, Exception) as exc:  # noqa: BLE001 - stated in the report
        note = f"the second solver failed ({type(exc).__name__}: {exc})"
        return Certificate(method="cross-solver agreement", note=note), {"error": note}
    c = correlations(main_row.numpy(), other_row.numpy())
    top = torch.argsort(main_row.abs(), descending=True)[: cfg.certificate_k].tolist()
    rows = tuple((f"train row {i}", float(main_row[i]), float(other_row[i])) for i in top)
    rel = float((main_row - other_row).norm() / main_row.norm().clamp_min(1e-300))
    cert = Certificate(
        method=(
            f"Cross-solver agreement: I_up,loss of the first explained test row for all {n} "
            f"training rows computed with {main_name} and again with {other.name}; relative "
            f"difference {rel:.2e}. This checks the inverse-Hessian solve, not how well the "
            "influence approximation predicts retraining (see docs/explain.md)."
        ),
        pearson=c["pearson"], spearman=c["spearman"], n_points=n, rows=rows,
        columns=(f"I_up,loss ({main_name})", f"I_up,loss ({other.name})"),
    )  # fmt: skip
    return cert, {"method": "solvers", "other": other.name, "relative_difference": rel, **c}


# ---------------------------------------------------------------------------- rendering
def _label_text(table: Table, v: Any) -> str:
    from .report import format_number

    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else None
    if v is None:
        return "-"
    if table.class_names and isinstance(v, int) and 0 <= v < len(table.class_names):
        return f"{table.class_names[v]} ({v})" if table.class_names[v] != str(v) else str(v)
    return format_number(v)


def _example(table: Table, i: int, token_scores: Sequence[float] | None = None):
    from .report import Example, format_number, image_data_uri

    label = _label_text(table, table.y[i] if table.y.ndim == 1 else None)
    if table.kind == "image":
        a = table.x[i].double().numpy()
        if table.image_shape:
            a = a.reshape(table.image_shape)
        side = max(a.shape[-2:] if a.ndim == 3 and a.shape[0] in (1, 3, 4) else a.shape[:2])
        scale = max(1, math.ceil(64 / side)) if side < 64 else 1
        lo, hi = table.value_range
        return Example(i, label, "image", image_uri=image_data_uri(a, lo, hi, scale))
    if table.kind == "text":
        return Example(i, label, "text", tokens=tuple(table.tokens[i]),
                       token_scores=tuple(token_scores) if token_scores is not None else None)  # fmt: skip
    vals = table.x[i].reshape(-1).tolist()
    names = table.feature_names or [f"x{j}" for j in range(len(vals))]
    shown = [(n, format_number(v)) for n, v in zip(names[:24], vals[:24])]
    if len(vals) > 24:
        shown.append(("...", f"+{len(vals) - 24} more"))
    return Example(i, label, "table", features=tuple(shown))


def _token_scores(inf: Any, test_one: tuple, idx: list[int], train: Table, log):
    """Per-token scores of the shown training texts if the Influence offers them."""
    fn = getattr(inf, "token_influence", None)
    if fn is None or train.kind != "text":
        return None
    try:
        ts = fn(test_one, idx)
    except Exception as exc:  # noqa: BLE001 - highlights are optional; say why they are missing
        log(f"token highlights skipped ({type(exc).__name__}: {exc})")
        return None
    ts = torch.as_tensor(ts).detach().cpu()
    if ts.ndim != 3 or ts.shape[:2] != (1, len(idx)):
        log(f"token highlights skipped (token_influence returned shape {tuple(ts.shape)})")
        return None
    return [[float(ts[0, j, p]) for p in train.positions[i]] for j, i in enumerate(idx)]


# ---------------------------------------------------------------------------- the command
@dataclass
class ExplainResult:
    """What :func:`run_explain` wrote and measured."""

    out: Path
    report: Path
    rows: list[int]
    scores: torch.Tensor
    metrics: dict[str, Any]


def run_explain(cfg: ExplainConfig) -> ExplainResult:
    """Load, fit, score, check and write everything ``inflens explain`` promises (module doc)."""
    from ._version import __version__
    from .artifacts import _save_tensors, data_fingerprint, model_fingerprint
    from .data import Data
    from .influence import Influence
    from .objective import Objective
    from .report import Explanation, ReportInfo, Scored, render_report

    log = _Log(cfg.progress)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log(f"loading model {cfg.model}")
    model = load_model(cfg.model, cfg.factory, cfg.factory_kwargs)
    opt = DataOptions(cfg.x_key, cfg.y_key, cfg.target, cfg.features, cfg.image_shape,
                      cfg.image_size, cfg.text_field, cfg.label_field, cfg.max_length)  # fmt: skip
    log(f"reading training data {cfg.train}")
    train = load_data(cfg.train, opt, model, split="train")
    log(f"reading test data {cfg.test}")
    test = load_data(cfg.test, opt, model, label_map=train.label_map, split="test")
    if model.class_names and not train.class_names:
        train.class_names = test.class_names = model.class_names
    if len(train) == 0 or len(test) == 0:
        raise InputError("the training and the test data must each hold at least one row")
    if train.x.shape[1:] != test.x.shape[1:] and train.kind != "text":
        raise InputError(
            f"training inputs have shape {tuple(train.x.shape[1:])} per row but test inputs "
            f"{tuple(test.x.shape[1:])}"
        )

    sklearn = model.kind == "sklearn"
    if sklearn:
        log("mapping the scikit-learn estimator (inflens.from_sklearn)")
        inf = _sklearn_influence(model, train, cfg)
        obj = inf.objective
        train_data = inf.train
        test_data = inf.encode(test.x.numpy(), _raw_labels(test))  # the bridge's target layout
    else:
        module = model.module.to(cfg.device)
        dtype = next(module.parameters()).dtype
        loss = cfg.loss or _default_loss(model, train.y)
        y_train, y_test = train.y, test.y
        if loss == "mse":
            y_train, y_test = y_train.to(dtype), y_test.to(dtype)
            if y_train.ndim == 1:
                y_train, y_test = y_train[:, None], y_test[:, None]
        x_train = train.x.to(dtype) if train.x.is_floating_point() else train.x
        x_test = test.x.to(dtype) if test.x.is_floating_point() else test.x
        _probe(model, module, x_train)
        params = [model.prefix(p) for p in cfg.params] if cfg.params else None
        obj = Objective(module, loss, l2=cfg.l2, params=params)
        train_data = Data((x_train, y_train), "training data")
        test_data = Data((x_test, y_test), "test data")
        inf = Influence(obj, train_data, solver=_solver(cfg, obj.p), damping=cfg.damping,
                        progress=cfg.progress, curvature=cfg.curvature)  # fmt: skip
    x_test, y_test = test_data.x, test_data.y
    n = len(train)
    log(f"model: {model.description}; p = {obj.p} parameters, loss {obj.loss_name}, "
        f"l2 {obj.l2}; n_train = {n}, n_test = {len(test)}")  # fmt: skip

    art = out / "influence"
    resumed = False
    if cfg.resume and not sklearn and (art / "config.json").is_file():
        log(f"--resume: loading the fitted state from {art}")
        inf = Influence.load(art, obj, train_data, progress=cfg.progress)
        resumed = True
    elif inf.curvature_ is None:
        log(f"fitting the {inf.solver.name} solver (damping {inf.damping})")
        inf.fit()
    if not resumed and not sklearn:  # from_sklearn refits in well under a second: not saved
        inf.save(art)

    log("computing test losses and predictions")
    outputs, losses = _forward_all(obj, x_test, y_test)
    if sklearn:
        est_pred = model.estimator.predict(test.x.numpy())
        pred_text = [str(v) for v in est_pred]
        classifier = hasattr(model.estimator, "classes_")
        wrong = torch.from_numpy(est_pred != _raw_labels(test)) if classifier else None
    else:
        pred = predicted_labels(obj.loss_name, outputs, y_test) if obj.builtin_loss else None
        pred_text = [_label_text(test, int(v)) for v in pred] if pred is not None else None
        wrong = (pred != y_test.reshape(pred.shape)) if pred is not None else None
    rows, how = choose_rows(cfg, len(test), losses, wrong)
    log(f"explaining test rows {rows} ({how})")

    idx = torch.tensor(rows, dtype=torch.long)
    test_sel = Data((x_test[idx], y_test[idx]), "test data")
    key = hashlib.sha256((data_fingerprint(test_sel) + json.dumps(rows)).encode()).hexdigest()[:16]
    scoring = out / "scoring" / key
    if not cfg.resume and scoring.exists():
        shutil.rmtree(scoring)
    log(f"scoring {n} training rows against {len(rows)} test rows -> {scoring}")
    t1 = time.perf_counter()
    scores = inf.score_to_folder(test_sel, scoring).cpu()  # [k, n], I_up,loss
    t_score = time.perf_counter() - t1

    self_inf = None
    outlier_note = ""
    if cfg.outliers > 0:
        direct = getattr(inf.solver, "direct", False) or inf.solver.name == "exact"
        if direct or n <= 1000:
            log("self-influence of every training row")
            self_inf = inf.self_influence().cpu()
        else:
            outlier_note = (
                f"Self-influence skipped: with the iterative {inf.solver.name!r} solver it needs "
                f"one solve per training row ({n}); use --solver exact, arnoldi, kfac or ekfac."
            )

    test_one = Data((x_test[idx[:1]], y_test[idx[:1]]), "test data")

    def rebuild(solver: Any) -> Any:
        if sklearn:
            return _sklearn_influence(model, train, replace(cfg, solver="auto"), solver=solver)
        return Influence(obj, train_data, solver=solver, damping=inf.damping,
                         progress=cfg.progress, curvature=cfg.curvature).fit()  # fmt: skip

    cert, cert_json = _certificate(inf, test_one, scores[0], cfg, log, rebuild, not sklearn)

    # ------------------------------------------------------------ outputs
    meta = {
        "convention": "scores = I_up,loss(z_i, z_test), [k, n_train]; negative = helpful; "
        "predicted_loss_change = -scores / n_train",
        "test_rows": json.dumps(rows),
        "model_fingerprint": model_fingerprint(obj),
        "data_fingerprint": data_fingerprint(inf.train),
    }
    tensors = {"scores": scores.contiguous(), "test_rows": idx}
    if self_inf is not None:
        tensors["self_influence"] = self_inf
    _save_tensors(out / "scores.safetensors", tensors, meta)

    explanations = []
    top_rows: list[dict[str, Any]] = []
    for j, r in enumerate(rows):
        row = scores[j]
        k = min(cfg.top, n)
        helpful = torch.argsort(row)[:k].tolist()
        harmful = torch.argsort(row, descending=True)[:k].tolist()
        one = Data((x_test[r : r + 1], y_test[r : r + 1]), "test data")
        ts = _token_scores(inf, one, helpful + harmful, train, log)
        scored = {}
        for m, i in enumerate(helpful + harmful):
            tok = ts[m] if ts is not None else None
            scored[i] = Scored(_example(train, i, tok), float(row[i]), float(-row[i] / n))
        for kind, lst in (("helpful", helpful), ("harmful", harmful)):
            for rank, i in enumerate(lst, 1):
                top_rows.append({
                    "test_row": r, "test_label": _label_text(test, test.y[r] if test.y.ndim == 1 else None),
                    "predicted": pred_text[r] if pred_text is not None else "",
                    "kind": kind, "rank": rank, "train_row": i,
                    "train_label": _label_text(train, train.y[i] if train.y.ndim == 1 else None),
                    "influence": float(row[i]), "predicted_loss_change": float(-row[i] / n),
                })  # fmt: skip
        explanations.append(
            Explanation(
                test=_example(test, r),
                predicted=pred_text[r] if pred_text is not None else "n/a",
                loss=float(losses[r]),
                helpful=tuple(scored[i] for i in helpful),
                harmful=tuple(scored[i] for i in harmful),
            )
        )
    with open(out / "top.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(top_rows[0]))
        w.writeheader()
        w.writerows(top_rows)

    outliers: tuple[Scored, ...] = ()
    if self_inf is not None:
        worst = torch.argsort(self_inf)[: min(cfg.outliers, n)].tolist()
        outliers = tuple(Scored(_example(train, i), float(self_inf[i]), float(-self_inf[i] / n))
                         for i in worst)  # fmt: skip
        outlier_note = (
            f"The {len(worst)} training rows with the most negative self-influence "
            "I_up,loss(z_i, z_i): each one's own loss depends most on itself, so these are the "
            "first to check for wrong labels (Koh & Liang 2017, Sec. 5.4). Predicted loss "
            "change = the rise of the row's own loss if it were removed."
        )

    fingerprints = {
        "model parameters (sha256)": model_fingerprint(obj),
        "training data (sha256)": data_fingerprint(inf.train),
        "explained test rows (sha256)": data_fingerprint(test_sel),
    }
    for f_ in model.files:
        if f_.is_file():
            fingerprints[f"file {f_.name} (sha256)"] = sha256_file(f_)
    for p_ in (Path(cfg.train), Path(cfg.test)):
        if p_.is_file():
            fingerprints[f"file {p_.name} (sha256)"] = sha256_file(p_)
    settings = {
        "model": model.description,
        "training data": f"{cfg.train} ({n} rows, {train.kind})",
        "test data": f"{cfg.test} ({len(test)} rows)",
        "rows": how,
        "loss": obj.loss_name,
        "l2": repr(obj.l2),
        "parameters": f"p = {obj.p}" + (f" ({', '.join(cfg.params)})" if cfg.params else ""),
        "solver": inf.solver.name,
        "curvature": getattr(inf, "curvature", "hessian"),
        "damping": repr(inf.damping),
        "dtype": str(obj.dtype),
        "resumed": str(resumed),
        "scoring time": f"{t_score:.2f} s",
        "inflens": __version__,
    }
    summary = (
        ("model", model.description),
        ("training rows", str(n)),
        ("explained", how),
        ("certificate", f"Pearson R {cert.pearson:.4f} ({cert_json.get('method')})"
         if cert is not None and cert.pearson is not None else "see below"),
    )  # fmt: skip
    info = ReportInfo(
        title=cfg.title or f"inflens: why did the model predict this? ({Path(cfg.model).name})",
        summary=summary,
        settings=tuple(settings.items()),
        fingerprints=tuple(fingerprints.items()),
        outliers=outliers,
        outlier_note=outlier_note or "Self-influence not requested (--outliers 0).",
        certificate=cert,
        version=__version__,
    )
    report = render_report(explanations, out / "report", info)
    metrics = {
        "rows": rows,
        "selection": how,
        "settings": settings,
        "fingerprints": fingerprints,
        "certificate": cert_json,
        "config": {k: v for k, v in asdict(cfg).items()},
        "seconds": {"scoring": t_score, "total": time.perf_counter() - t0},
    }
    (out / "explain.json").write_text(json.dumps(metrics, indent=2, default=str))
    _print_summary(explanations, n, cert, report)
    return ExplainResult(out, report, rows, scores, metrics)


def _print_summary(explanations, n: int, cert, report: Path) -> None:
    print("negative I_up,loss = helpful; predicted change = -I_up,loss/n (positive: removing the "
          "row would raise the test loss)")  # fmt: skip
    for e in explanations:
        print(f"\ntest row {e.test.index}: label {e.test.label}, predicted {e.predicted}, "
              f"loss {e.loss:.4g}")  # fmt: skip
        print(
            f"  {'':8s}{'train row':>10s} {'label':>12s} {'I_up,loss':>12s} {'pred. change':>13s}"
        )
        for kind, lst in (("helpful", e.helpful[:3]), ("harmful", e.harmful[:3])):
            for s in lst:
                print(f"  {kind:8s}{s.example.index:>10d} {s.example.label:>12s} "
                      f"{s.influence:>+12.3e} {s.loss_change:>+13.3e}")  # fmt: skip
    if cert is not None and cert.pearson is not None:
        print(f"\ncertificate: Pearson R {cert.pearson:.4f} over {cert.n_points} points")
    print(f"report: {report}")


# ---------------------------------------------------------------------------- digits example
def digits_model() -> nn.Module:
    """The demo's architecture: 10-class logistic regression on 8x8 digits, no bias, float64."""
    return nn.Linear(64, 10, bias=False).double()


DIGITS_FACTORY = "inflens.explain:digits_model"
DIGITS_L2 = 0.01


def write_digits_example(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Train the demo's model on scikit-learn digits and write it as a user would.

    Writes ``model.safetensors`` (the state dict), ``train.npz`` and ``test.npz`` (``X`` flat
    ``[n, 64]`` in ``[0, 1]``, ``y``, ``image_shape = (8, 8)``), so that ``inflens explain``
    reads them through the same code path as any user's files.
    """
    from safetensors.torch import save_file

    from .experiments.demo import load_digits_split
    from .influence import Influence
    from .objective import Objective
    from .train import fit_lbfgs, fit_newton

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = load_digits_split(seed)
    model = digits_model()
    nn.init.zeros_(model.weight)
    obj = Objective(model, "cross_entropy", l2=DIGITS_L2)
    first = fit_lbfgs(obj, (xtr, ytr), tol=1e-8)
    obj.load_into_model(getattr(first, "theta", first))
    obj = Objective(model, "cross_entropy", l2=DIGITS_L2)
    pre = Influence(obj, (xtr, ytr), solver="exact", progress=False).fit()
    theta, _ = fit_newton(obj, (xtr, ytr), pre.solver.solve, tol=1e-12)
    obj.load_into_model(theta)
    paths = {
        "model": folder / "model.safetensors",
        "train": folder / "train.npz",
        "test": folder / "test.npz",
    }
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(paths["model"]))
    shape = np.asarray([8, 8])
    np.savez(paths["train"], X=xtr.numpy(), y=ytr.numpy(), image_shape=shape)
    np.savez(paths["test"], X=xte.numpy(), y=yte.numpy(), image_shape=shape)
    return paths


def example_config(name: str, out: str | Path, **overrides: Any) -> ExplainConfig:
    """``inflens explain --example digits``: write the example's files, return their config."""
    if name != "digits":
        raise InputError(f"unknown example {name!r}; available: digits")
    paths = write_digits_example(Path(out) / "example")
    base = {
        "model": str(paths["model"]),
        "train": str(paths["train"]),
        "test": str(paths["test"]),
        "out": str(out),
        "factory": DIGITS_FACTORY,
        "l2": DIGITS_L2,
        "title": "inflens: digits the model got wrong, explained by its training images",
    }
    base.update(overrides)
    return ExplainConfig(**base)


# ---------------------------------------------------------------------------- command line
def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError as exc:
        raise InputError(f"expected comma-separated integers, got {text!r}") from exc


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_parser(sub: Any, threads_help: str) -> None:
    """Add the ``explain`` sub-command to the ``inflens`` argument parser."""
    p = sub.add_parser(
        "explain",
        help="explain your own model's predictions through its training data (HTML report)",
        description=(
            "Explain test predictions of a model through its training data. Writes "
            "OUT/report/index.html, OUT/scores.safetensors (I_up,loss [k, n_train], negative = "
            "helpful) and OUT/top.csv. Try: inflens explain --example digits --out DIR"
        ),
    )
    g = p.add_argument_group("inputs")
    g.add_argument("--example", choices=["digits"], default=None,
                   help="write the demo's model and data to OUT/example/ and explain them")  # fmt: skip
    g.add_argument("--model", help="model.safetensors (+ --factory), TorchScript .pt, "
                   "torch.export .pt2, a Hugging Face folder, or a scikit-learn .skops file")  # fmt: skip
    g.add_argument("--factory", help="package.module:function that builds the model's architecture")
    g.add_argument("--factory-kwargs", default="{}", help="JSON keyword arguments for --factory")
    g.add_argument("--train", help="training data: .npz, .csv, .parquet, .jsonl, image folder, "
                   "datasets folder")  # fmt: skip
    g.add_argument("--test", help="test data, in the same format as --train")
    g.add_argument("--x-key", default="X", help=".npz array of inputs (default X)")
    g.add_argument("--y-key", default="y", help=".npz array of targets (default y)")
    g.add_argument("--target", help="target column of a table (.csv/.parquet)")
    g.add_argument("--features", help="comma-separated feature columns (default: all but --target)")
    g.add_argument("--image-shape", help="show flat inputs as images of this shape, e.g. 28,28")
    g.add_argument("--image-size", help="resize the images of an image folder to H,W")
    g.add_argument("--text-field", default="text", help="text field of JSON Lines / datasets")
    g.add_argument("--label-field", default="label", help="label field of JSON Lines / datasets")
    g.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    w = p.add_argument_group("what to explain")
    w.add_argument("--rows", help="test rows to explain, e.g. 3,17")
    w.add_argument("--rows-file", help="file of test row numbers")
    w.add_argument("--select", choices=SELECTIONS, default="misclassified",
                   help="without --rows: which test rows (default misclassified, highest loss first)")  # fmt: skip
    w.add_argument("--count", type=int, default=3, help="how many rows --select picks (default 3)")
    w.add_argument("--top", type=int, default=5, help="helpful and harmful rows shown per test row")
    s = p.add_argument_group("influence")
    s.add_argument("--solver", choices=SOLVERS, default="auto",
                   help=f"auto = exact for p <= {AUTO_EXACT_MAX_P}, else cg")  # fmt: skip
    s.add_argument("--damping", type=float, default=0.0, help="added to the Hessian (Sec. 4.2)")
    s.add_argument("--l2", type=float, default=None,
                   help="the l2 the model was trained with: mean loss + l2/2 ||theta||^2 (default 0)")  # fmt: skip
    s.add_argument("--loss", choices=["cross_entropy", "binary_logistic", "hinge", "smooth_hinge",
                   "mse"], help="training loss (default cross_entropy for integer labels, mse "
                   "otherwise, next-token loss for language models)")  # fmt: skip
    s.add_argument("--curvature", choices=["hessian", "ggn"], default="hessian")
    s.add_argument("--params", help="comma-separated parameter names/prefixes to explain "
                   "(the rest frozen), e.g. classifier.")  # fmt: skip
    s.add_argument("--max-memory-gb", type=float, default=4.0,
                   help="memory allowed for the explicit Hessian of the exact solver")  # fmt: skip
    s.add_argument("--resume", action="store_true",
                   help="reuse OUT/influence and finished score chunks of an earlier run")  # fmt: skip
    s.add_argument("--outliers", type=int, default=10, help="self-influence outliers listed")
    s.add_argument("--certificate", choices=CERTIFICATES, default="auto",
                   help="accuracy check: leave-one-out refits (convex linear models) or a second solver")  # fmt: skip
    s.add_argument("--certificate-k", type=int, default=10, help="points the check uses")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--title", help="report title")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--threads", type=int, default=None, help=threads_help)


def config_from_args(args: Any) -> ExplainConfig:
    """An :class:`ExplainConfig` from parsed ``inflens explain`` arguments."""
    common = dict(
        factory_kwargs=args.factory_kwargs,
        x_key=args.x_key,
        y_key=args.y_key,
        target=args.target,
        features=_names(args.features) if args.features else None,
        image_shape=_ints(args.image_shape) if args.image_shape else None,
        image_size=_ints(args.image_size) if args.image_size else None,
        text_field=args.text_field,
        label_field=args.label_field,
        max_length=args.max_length,
        rows=_ints(args.rows) if args.rows else None,
        rows_file=args.rows_file,
        select=args.select,
        count=args.count,
        solver=args.solver,
        damping=args.damping,
        loss=args.loss,
        curvature=args.curvature,
        params=_names(args.params) if args.params else None,
        max_memory_gb=args.max_memory_gb,
        resume=args.resume,
        top=args.top,
        outliers=args.outliers,
        certificate=args.certificate,
        certificate_k=args.certificate_k,
        device=args.device,
        progress=not args.quiet,
    )
    if args.title:
        common["title"] = args.title
    if args.l2 is not None:
        common["l2"] = args.l2
    if args.example:
        given = [f for f in ("model", "train", "test", "factory") if getattr(args, f)]
        if given:
            raise InputError(f"--example writes its own files; drop --{', --'.join(given)}")
        if args.image_shape is None:
            common.pop("image_shape")
        return example_config(args.example, args.out, **common)
    missing = [f"--{f}" for f in ("model", "train", "test") if not getattr(args, f)]
    if missing:
        raise InputError(f"missing {', '.join(missing)} (or use --example digits)")
    return ExplainConfig(model=args.model, train=args.train, test=args.test, out=args.out,
                         factory=args.factory, **common)  # fmt: skip


def main(args: Any) -> int:
    """Run ``inflens explain``; an input error prints one line and returns exit code 2."""
    from .errors import InflensError

    try:
        cfg = config_from_args(args)
        if args.example:
            print(f"wrote the example's model and data to {Path(args.out) / 'example'}; the same "
                  "run on your own files:\n  " + example_command(cfg), file=sys.stderr)  # fmt: skip
        run_explain(cfg)
    except InflensError as exc:
        print("inflens explain: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    return 0


def example_command(cfg: ExplainConfig) -> str:
    """The ``inflens explain`` command line that reads the example's files directly."""
    return (
        f"inflens explain --model {cfg.model} --factory {cfg.factory} --train {cfg.train} "
        f"--test {cfg.test} --l2 {cfg.l2} --out {cfg.out}"
    )

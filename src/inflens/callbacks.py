"""Save what ``inflens explain`` needs at the end of training (and, optionally, along the way).

- :func:`save_for_inflens` (plain PyTorch): the weights as ``model.safetensors`` plus
  ``inflens_model.json`` naming the factory that rebuilds the architecture, so that
  ``inflens explain --model FOLDER`` needs no ``--factory``. A Hugging Face model is written
  with ``save_pretrained`` (safetensors and ``config.json``) and its tokenizer beside it.
- :func:`save_checkpoint`: the weights at one training step with the learning rate in use,
  appended to ``checkpoints.json``: what TracIn (Pruthi et al. 2020) sums over,
  ``sum_t lr_t grad L(z_test; theta_t) . grad L(z_i; theta_t)``. inflens explain itself uses the
  final weights; the checkpoints are kept for checkpoint-based methods.
- ``InflensCallback`` (only when transformers is installed): a ``transformers.TrainerCallback``
  doing both inside ``Trainer``.

Nothing is pickled: every tensor file is safetensors, every description JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError

MODEL_JSON = "inflens_model.json"
CHECKPOINTS_JSON = "checkpoints.json"


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share memory (tied weights)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def save_for_inflens(
    model: nn.Module,
    folder: str | os.PathLike,
    factory: str | None = None,
    factory_kwargs: dict[str, Any] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write the trained ``model`` to ``folder`` in a form ``inflens explain --model`` reads.

    A Hugging Face model (one with ``save_pretrained``) is saved with it (safetensors weights,
    ``config.json``) and ``tokenizer`` beside it. Any other module needs ``factory``, the
    ``package.module:function`` that builds its architecture (called with ``factory_kwargs``);
    the state dict goes to ``model.safetensors`` and the factory to ``inflens_model.json``.
    Returns the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(str(folder), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        return folder
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not factory or ":" not in factory:
        raise InputError(
            "a plain PyTorch model needs factory='package.module:function' that builds its "
            "architecture (inflens explain imports and calls it, then loads the weights)"
        )
    from safetensors.torch import save_file

    tmp = folder / "model.safetensors.tmp"
    save_file(_state_tensors(model), str(tmp))
    os.replace(tmp, folder / "model.safetensors")
    from ._version import __version__

    _write_json(
        folder / MODEL_JSON,
        {
            "format": "safetensors+factory",
            "weights": "model.safetensors",
            "factory": factory,
            "factory_kwargs": dict(factory_kwargs or {}),
            "inflens": __version__,
        },
    )
    return folder


def save_checkpoint(
    model: nn.Module, folder: str | os.PathLike, step: int, learning_rate: float
) -> Path:
    """Save the weights at training ``step`` to ``folder/checkpoints/step_<step>.safetensors``.

    ``checkpoints.json`` lists every saved step with its learning rate, in step order (a
    re-saved step replaces its entry). Returns the checkpoint's path.
    """
    from safetensors.torch import save_file

    if int(step) < 0 or not float(learning_rate) >= 0:
        raise InputError(f"step must be >= 0 and learning_rate >= 0, got {step}, {learning_rate}")
    folder = Path(folder)
    ckpt = folder / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    name = f"step_{int(step):08d}.safetensors"
    tmp = ckpt / (name + ".tmp")
    save_file(
        _state_tensors(model), str(tmp), {"step": str(int(step)), "lr": repr(float(learning_rate))}
    )
    os.replace(tmp, ckpt / name)
    index = folder / CHECKPOINTS_JSON
    entries = json.loads(index.read_text())["checkpoints"] if index.is_file() else []
    entries = [e for e in entries if e["step"] != int(step)]
    entries.append(
        {"step": int(step), "learning_rate": float(learning_rate), "file": f"checkpoints/{name}"}
    )
    _write_json(index, {"checkpoints": sorted(entries, key=lambda e: e["step"])})
    return ckpt / name


def read_checkpoints(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``checkpoints.json`` entries (step, learning_rate, file) of a folder, in step order."""
    index = Path(folder) / CHECKPOINTS_JSON
    if not index.is_file():
        return []
    return list(json.loads(index.read_text())["checkpoints"])


def _make_callback_class() -> type:
    from transformers import TrainerCallback

    class InflensCallback(TrainerCallback):
        """Saves the final model for ``inflens explain`` and, every ``checkpoint_every`` steps,
        a TracIn checkpoint with the learning rate in use.

        Args:
            folder: where to write (``inflens explain --model FOLDER`` reads it).
            checkpoint_every: save a checkpoint every this many optimiser steps (``None``: none).
            tokenizer: saved beside the model (default: the Trainer's processing class).
        """

        def __init__(
            self,
            folder: str | os.PathLike,
            checkpoint_every: int | None = None,
            tokenizer: Any = None,
        ) -> None:
            if checkpoint_every is not None and int(checkpoint_every) < 1:
                raise InputError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
            self.folder = Path(folder)
            self.checkpoint_every = checkpoint_every
            self.tokenizer = tokenizer

        @staticmethod
        def _lr(kwargs: dict[str, Any]) -> float:
            sched = kwargs.get("lr_scheduler")
            if sched is not None and hasattr(sched, "get_last_lr"):
                return float(sched.get_last_lr()[0])
            opt = kwargs.get("optimizer")
            if opt is not None:
                return float(opt.param_groups[0]["lr"])
            raise InputError("the Trainer passed neither an lr_scheduler nor an optimizer")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            every = self.checkpoint_every
            if every and state.is_world_process_zero and state.global_step % every == 0:
                save_checkpoint(kwargs["model"], self.folder, state.global_step, self._lr(kwargs))
            return control

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.is_world_process_zero:
                tok = self.tokenizer or kwargs.get("processing_class") or kwargs.get("tokenizer")
                save_for_inflens(kwargs["model"], self.folder, tokenizer=tok)
            return control

    return InflensCallback


def __getattr__(name: str) -> Any:
    # transformers is optional: the callback class is built on first use
    if name == "InflensCallback":
        try:
            cls = _make_callback_class()
        except ImportError as exc:
            raise ImportError(
                "inflens.callbacks.InflensCallback needs transformers: pip install transformers"
            ) from exc
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

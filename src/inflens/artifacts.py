"""Fitted state and scores on disk: fingerprinted, resumable, never pickled.

Layout of an artifact folder (every tensor file is safetensors, every description JSON):

- ``config.json``: what was fitted (solver, its settings, damping, n, p, dtype, inflens
  version) and the fingerprints of the model parameters and of the training data.
- ``curvature.safetensors`` + ``solver.json``: the solver's fitted tensors (an eigensystem, a
  factorisation...) and its non-tensor fitted values (a LiSSA scale, diagnostics).
- ``<name>.safetensors`` (:func:`save_vectors`): s_test or other ``[k, p]`` vectors.
- ``scores/`` (:func:`score_to_folder`): a score matrix ``[k, n]`` written chunk by chunk,
  ``chunk_<j>.safetensors`` holding the columns ``[j * c, (j + 1) * c)``. Each chunk is written
  to a temporary file and renamed into place, so a run killed at any moment leaves only whole
  chunks; started again, it computes only the missing ones.

A fingerprint is the SHA-256 of the exact bytes (and names, shapes, dtypes) of the selected
parameters, the frozen parameters and buffers, the loss and ``l2`` (the *model*), and of the
training inputs and targets (the *data*). Loading against a different model or data raises
:class:`ArtifactMismatchError` saying which of the two differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from .data import DataLike
from .errors import InflensError, InputError
from .fingerprint import data_fingerprint, hash_tensor, model_fingerprint
from .layout import canonical
from .objective import Objective

if TYPE_CHECKING:
    from .influence import Influence

FORMAT_VERSION = 1


class ArtifactMismatchError(InflensError):
    """An artifact on disk was made with a different model, data or configuration."""


# ---------------------------------------------------------------------------- fingerprints
def vectors_fingerprint(vecs: torch.Tensor) -> str:
    """SHA-256 of a tensor's shape, dtype and bytes."""
    h = hashlib.sha256()
    hash_tensor(h, "v", vecs)
    return h.hexdigest()


# ---------------------------------------------------------------------------- small helpers
def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path} does not exist: not an inflens artifact folder")
    return json.loads(path.read_text())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write safetensors atomically (temporary file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), meta)
    os.replace(tmp, path)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _check(saved: dict[str, Any], key: str, now: str, folder: Path, what: str, fix: str) -> None:
    if saved.get(key) != now:
        raise ArtifactMismatchError(
            f"the artifact in {folder} was computed with different {what} "
            f"(fingerprint {str(saved.get(key))[:12]}..., now {now[:12]}...); {fix}"
        )


_MODEL_FIX = "load it with the same trained model (same parameters, loss and l2) or refit"
_DATA_FIX = "load it with the same training data in the same order, or refit"


# ---------------------------------------------------------------------------- solver state
def _solver_state(solver: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a fitted solver's :meth:`~inflens.solvers.Solver.state_dict` into tensors and
    JSON values: tensors (also inside lists and str-keyed dicts, and nested solvers' states)
    go to safetensors under dotted keys, the rest must be JSON-serialisable.
    """
    from .solvers import Solver

    state = solver.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    for key, v in state.items():
        if key == "curvature_":
            continue
        if isinstance(v, Solver):  # a nested solver (CG's preconditioner): its own state
            sub_tensors, sub_values = _solver_state(v)
            values[key] = {"__solver__": v.name, "values": sub_values}
            tensors.update({f"{key}.{k}": t for k, t in sub_tensors.items()})
        elif isinstance(v, torch.Tensor):
            tensors[key] = v
        elif isinstance(v, (list, tuple)) and v and all(isinstance(e, torch.Tensor) for e in v):
            values[key] = {"__tensors__": "list", "len": len(v)}
            tensors.update({f"{key}.{i}": e for i, e in enumerate(v)})
        elif isinstance(v, dict) and v and all(isinstance(e, torch.Tensor) for e in v.values()):
            values[key] = {"__tensors__": "dict", "keys": list(v)}
            tensors.update({f"{key}.{k}": e for k, e in v.items()})
        elif _jsonable(v):
            values[key] = v
        else:
            raise InputError(
                f"the {type(solver).__name__} solver keeps fitted state {key!r} of type "
                f"{type(v).__name__}, which cannot be saved without pickle; give the solver "
                "state_dict()/load_state_dict() methods that return tensors and JSON values"
            )
    return tensors, values


def _restore_solver(cls: type, tensors: dict[str, torch.Tensor], values: dict[str, Any], device):
    solver = cls.__new__(cls)
    state: dict[str, Any] = {}
    for key, v in values.items():
        if isinstance(v, dict) and "__solver__" in v:
            pre = key + "."
            sub = {k[len(pre) :]: t for k, t in tensors.items() if k.startswith(pre)}
            state[key] = _restore_solver(_solver_class(v["__solver__"]), sub, v["values"], device)
        elif isinstance(v, dict) and v.get("__tensors__") == "list":
            state[key] = [tensors[f"{key}.{i}"].to(device) for i in range(v["len"])]
        elif isinstance(v, dict) and v.get("__tensors__") == "dict":
            state[key] = {k: tensors[f"{key}.{k}"].to(device) for k in v["keys"]}
        else:
            state[key] = v
    for key, t in tensors.items():
        if "." not in key:
            state[key] = t.to(device)
    solver.load_state_dict(state)
    return solver


# ---------------------------------------------------------------------------- fitted Influence
def influence_config(inf: Influence) -> dict[str, Any]:
    """The JSON description of a fitted :class:`Influence` (without fingerprints)."""
    from ._version import __version__

    curv = inf._fitted()
    obj = inf.objective
    return {
        "format": FORMAT_VERSION,
        "inflens_version": __version__,
        "solver": inf.solver.name,
        "solver_class": f"{type(inf.solver).__module__}.{type(inf.solver).__qualname__}",
        "damping": inf.damping,
        "curvature": inf.curvature,
        "batch_size": inf.batch_size,
        "chunk_size": curv.chunk_size,
        "scoring": inf.scoring,
        "n_train": curv.n,
        "p": obj.p,
        "dtype": str(obj.dtype),
        "loss": obj.loss_name,
        "l2": obj.l2 if obj.l2_diag is None else None,  # None: per-parameter (fingerprinted)
        "l2_per_parameter": obj.l2_diag is not None,
        "params": list(obj.names),
        "model_class": type(obj.model).__qualname__,
    }


def save_influence(inf: Influence, folder: str | os.PathLike) -> Path:
    """Write a fitted Influence's configuration, fingerprints and solver state to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = influence_config(inf)
    cfg["model_fingerprint"] = model_fingerprint(inf.objective)
    cfg["data_fingerprint"] = data_fingerprint(inf.train)
    tensors, values = _solver_state(inf.solver)
    _save_tensors(folder / "curvature.safetensors", tensors, {"format": str(FORMAT_VERSION)})
    _write_json(folder / "solver.json", values)
    _write_json(folder / "config.json", cfg)  # last: its presence marks a complete artifact
    return folder


def _solver_class(name: str) -> type:
    from .solvers import make_solver

    try:
        return type(make_solver(name))
    except ValueError as exc:
        raise InputError(
            f"the artifact was fitted with solver {name!r}, which is not registered here; "
            "register it with inflens.solvers.register_solver before loading"
        ) from exc


def load_influence(
    folder: str | os.PathLike,
    objective: Objective,
    train: DataLike,
    progress: bool = True,
    check_data: bool = True,
    *,
    influence_class: type,
) -> Influence:
    """A fitted :class:`Influence` restored from ``folder`` without refitting
    (``Influence.load`` calls it with its own class).

    Refuses (:class:`ArtifactMismatchError`) when ``objective``'s parameters, loss or l2, or
    the training data (unless ``check_data=False``), differ from those it was fitted on.
    ``influence_class`` is the class to build (:class:`~inflens.Influence`, or e.g.
    :class:`inflens.distributed.DistributedInfluence`); this module does not import it, so
    that persistence stays below the queries in the layering.
    """
    folder = Path(folder)
    cfg = _read_json(folder / "config.json")
    if cfg.get("format") != FORMAT_VERSION:
        raise InputError(f"{folder}: unknown artifact format {cfg.get('format')!r}")
    _check(cfg, "model_fingerprint", model_fingerprint(objective), folder, "model parameters",
           _MODEL_FIX)  # fmt: skip
    tensors = load_file(str(folder / "curvature.safetensors"))
    values = _read_json(folder / "solver.json")
    solver = _restore_solver(_solver_class(cfg["solver"]), tensors, values, objective.device)
    inf = influence_class(
        objective,
        train,
        solver=solver,
        damping=cfg["damping"],
        batch_size=cfg["batch_size"],
        progress=progress,
        scoring=cfg["scoring"],
        # artifacts written before the curvature kind was recorded were all fitted on H
        curvature=cfg.get("curvature", "hessian"),
    )
    if len(inf.train) != cfg["n_train"]:
        raise ArtifactMismatchError(
            f"the artifact in {folder} was fitted on {cfg['n_train']} training points, "
            f"the data given has {len(inf.train)}; {_DATA_FIX}"
        )
    if check_data:
        _check(cfg, "data_fingerprint", data_fingerprint(inf.train), folder, "training data",
               _DATA_FIX)  # fmt: skip
    curv = inf.curvature_class(objective, inf.train, cfg["damping"], cfg["chunk_size"], progress)
    curv.curvature = inf.curvature
    solver.curvature_ = curv
    inf.curvature_ = curv
    inf.model_state_ = objective.state_token()
    inf.n_train_ = curv.n
    return inf


# ---------------------------------------------------------------------------- vectors
def save_vectors(inf: Influence, folder: str | os.PathLike, name: str, vecs: torch.Tensor) -> Path:
    """Save ``[k, p]`` vectors (e.g. s_test) as ``folder/<name>.safetensors``, fingerprinted."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "model_fingerprint": model_fingerprint(inf.objective),
        "data_fingerprint": data_fingerprint(inf.train),
        "damping": repr(inf.damping),
        "solver": inf.solver.name,
    }
    path = folder / f"{name}.safetensors"
    _save_tensors(path, {"vectors": vecs}, meta)
    return path


def load_vectors(inf: Influence, folder: str | os.PathLike, name: str) -> torch.Tensor:
    """Vectors saved by :func:`save_vectors`, after checking model and data fingerprints."""
    from safetensors import safe_open

    path = Path(folder) / f"{name}.safetensors"
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        vecs = canonical(f.get_tensor("vectors"))
    _check(meta, "model_fingerprint", model_fingerprint(inf.objective), path, "model parameters",
           _MODEL_FIX)  # fmt: skip
    _check(meta, "data_fingerprint", data_fingerprint(inf.train), path, "training data",
           _DATA_FIX)  # fmt: skip
    if meta.get("damping") != repr(inf.damping):
        raise ArtifactMismatchError(
            f"{path} was computed with damping {meta.get('damping')}, this Influence has "
            f"{inf.damping!r}; use the same damping or recompute"
        )
    return vecs.to(inf.objective.device)


# ---------------------------------------------------------------------------- resumable scores
def _chunk_path(folder: Path, j: int) -> Path:
    return folder / f"chunk_{j:06d}.safetensors"


def score_to_folder(
    inf: Influence,
    vecs: torch.Tensor,
    folder: str | os.PathLike,
    chunk_size: int = 4096,
    chunks: Sequence[int] | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write ``inf.score(vecs)`` (``[k, n]``) to ``folder`` one chunk of training points at a time.

    Chunk ``j`` holds the columns ``[j * chunk_size, (j + 1) * chunk_size)``. Chunks already on
    disk are skipped, so a run that was killed resumes where it stopped and, as each chunk is a
    deterministic function of (model, data, vecs), yields the same numbers as one uninterrupted
    run. The folder's ``scores.json`` records the fingerprints; resuming with a different model,
    data, vectors or chunk size is refused.

    Args:
        inf: a fitted Influence.
        vecs: ``[k, p]`` vectors, e.g. ``inf.s_test(test)`` (then the scores are I_up,loss).
        folder: where to write (created if missing).
        chunk_size: training points per chunk file.
        chunks: only these chunk numbers (e.g. one rank's share); default all.
        callback: called as ``callback(j, num_chunks)`` after chunk ``j`` is written.

    Returns:
        ``{"num_chunks", "computed", "skipped"}``: counts of this call.
    """
    inf._fitted()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vecs = vecs.reshape(-1, inf.objective.p).to(inf.objective.dtype)
    n = inf.n
    num = -(-n // int(chunk_size))
    info = {
        "format": FORMAT_VERSION,
        "n_train": n,
        "k": int(vecs.shape[0]),
        "chunk_size": int(chunk_size),
        "num_chunks": num,
        "dtype": str(inf.objective.dtype),
        "model_fingerprint": model_fingerprint(inf.objective),
        "data_fingerprint": data_fingerprint(inf.train),
        "vectors_fingerprint": vectors_fingerprint(vecs),
        "config": influence_config(inf),
    }
    meta_path = folder / "scores.json"
    if meta_path.is_file():
        saved = json.loads(meta_path.read_text())
        _check(saved, "model_fingerprint", info["model_fingerprint"], folder, "model parameters",
               _MODEL_FIX)  # fmt: skip
        _check(saved, "data_fingerprint", info["data_fingerprint"], folder, "training data",
               _DATA_FIX)  # fmt: skip
        _check(saved, "vectors_fingerprint", info["vectors_fingerprint"], folder,
               "query vectors (s_test)", "score into a new folder")  # fmt: skip
        if saved.get("chunk_size") != info["chunk_size"]:
            raise ArtifactMismatchError(
                f"{folder} holds chunks of {saved.get('chunk_size')} points; resume with "
                f"chunk_size={saved.get('chunk_size')} or use a new folder"
            )
    else:
        try:
            _write_json(meta_path, info)
        except FileNotFoundError:  # another rank renamed its copy first: same content
            pass
    for stale in folder.glob("chunk_*.safetensors.tmp"):  # left by a killed run
        stale.unlink(missing_ok=True)
    todo = range(num) if chunks is None else chunks
    computed = skipped = 0
    for j in todo:
        path = _chunk_path(folder, j)
        if path.is_file():
            skipped += 1
            continue
        lo, hi = j * int(chunk_size), min(n, (j + 1) * int(chunk_size))
        block = inf.score(vecs, torch.arange(lo, hi))
        _save_tensors(path, {"scores": block}, {"start": str(lo), "stop": str(hi)})
        computed += 1
        if callback is not None:
            callback(j, num)
    return {"num_chunks": num, "computed": computed, "skipped": skipped}


def load_scores(folder: str | os.PathLike) -> torch.Tensor:
    """The full ``[k, n]`` score matrix from a finished :func:`score_to_folder` folder."""
    folder = Path(folder)
    info = _read_json(folder / "scores.json")
    missing = [j for j in range(info["num_chunks"]) if not _chunk_path(folder, j).is_file()]
    if missing:
        raise InputError(
            f"{folder} is missing {len(missing)} of {info['num_chunks']} score chunks (first: "
            f"{missing[0]}); run score_to_folder again with the same arguments to finish it"
        )
    parts = [load_file(str(_chunk_path(folder, j)))["scores"] for j in range(info["num_chunks"])]
    return torch.cat(parts, 1)


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def score_folder_for_test(
    inf: Influence,
    test: DataLike,
    folder: str | os.PathLike,
    chunk_size: int = 4096,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """I_up,loss ``[n_test, n]`` through ``folder``: s_test saved once, scores chunk by chunk.

    A restart reuses ``folder/s_test.safetensors`` (so a stochastic solver is not re-run with
    a different outcome) and only computes the missing chunks. Under ``torch.distributed``
    (:class:`inflens.distributed.DistributedInfluence`) each rank writes its own chunks.
    """
    folder = Path(folder)
    rank, _ = _rank_world()
    have = (folder / "s_test.safetensors").is_file()
    _barrier()  # every rank decided from the same state of the folder
    if have:
        s = load_vectors(inf, folder, "s_test")
    else:
        s = inf.s_test(test)
        if rank == 0:
            save_vectors(inf, folder, "s_test", s)
    mine = inf.my_chunks(chunk_size)
    if rank == 0:
        score_to_folder(inf, s, folder / "scores", chunk_size, mine, callback)
    _barrier()  # rank 0 wrote scores.json; the others check it and write their chunks
    if rank != 0:
        score_to_folder(inf, s, folder / "scores", chunk_size, mine, callback)
    _barrier()
    return load_scores(folder / "scores").to(inf.objective.device)

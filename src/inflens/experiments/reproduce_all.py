"""``inflens reproduce all``: re-run every experiment on the checked-out commit, with provenance.

Each experiment module keeps its own ``run(data_dir, out, quick, progress) -> dict`` and writes
its figures and ``metrics.json`` to ``out``. This module only wraps those runs: it calls each
``run()`` unchanged, then rewrites ``OUT/<name>/metrics.json`` as the experiment's metrics plus a
``"provenance"`` block (git commit and whether the tree was dirty, the command, library versions,
wall time, machine facts, threads). An experiment whose ``metrics.json`` already carries
provenance for the same commit and mode is skipped unless ``force`` is set, so an interrupted
``reproduce all`` resumes where it stopped.

:func:`compact` shrinks a metrics dict for committing (lists longer than ``max_list`` become a
summary) and :func:`export` writes those compact files to ``docs/reproduction/<name>/``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import InputError

MODES = ("quick", "full")
MAX_LIST = 50


@dataclass(frozen=True)
class ReproduceAllConfig:
    """What ``reproduce all`` runs.

    Attributes:
        out: folder; each experiment writes to ``out/<name>/``.
        mode: ``"quick"`` (each experiment's ``--quick`` subsample) or ``"full"`` (its default
            protocol; for fig2-cnn that is the shortened ``reduced`` protocol, not the paper's).
        only: experiment names to run (``None``: all, in name order).
        force: re-run experiments whose ``metrics.json`` is already from this commit and mode.
        data_dir: folder with the data sets (``None``: each loader's default search).
        progress: progress messages from the experiments.
        command: the command line recorded in the provenance.
        fig5_max_targets: fig5 attacks at most this many correctly classified test images (a
            seeded random sample, :class:`~inflens.experiments.fig5.Fig5Config`); ``None``: all
            of them (the paper's protocol). Recorded in the provenance as ``options``.
    """

    out: Path
    mode: str = "full"
    only: tuple[str, ...] | None = None
    force: bool = False
    data_dir: Path | None = None
    progress: bool = True
    command: str = field(default_factory=lambda: " ".join(map(shlex.quote, sys.argv)))
    fig5_max_targets: int | None = None

    def __post_init__(self) -> None:
        if self.fig5_max_targets is not None and int(self.fig5_max_targets) < 1:
            raise InputError(f"fig5_max_targets must be >= 1 or None, got {self.fig5_max_targets}")
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.only is not None and not self.only:
            raise InputError("only= is empty: pass None to run every experiment")


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    # only trailing whitespace: porcelain lines start with a status column that may be a space
    return res.stdout.rstrip() if res.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """``{"commit": HEAD or None, "dirty": bool or None, "dirty_files": [...]}`` of the cwd repo."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty_files = [] if not status else [line[3:] for line in status.splitlines()]
    return {
        "commit": commit,
        "dirty": None if status is None else bool(dirty_files),
        "dirty_files": dirty_files[:MAX_LIST],
    }


def machine() -> dict[str, Any]:
    """CPU model (from ``/proc/cpuinfo``), cores, threads torch uses, load average."""
    import torch

    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_start": load,
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
    }


def versions() -> dict[str, str | None]:
    """Python, torch, numpy, scipy, scikit-learn and inflens versions."""
    import numpy
    import torch

    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    for mod in ("scipy", "sklearn", "inflens"):
        try:
            out[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            out[mod] = None
    return out


def _done(path: Path, commit: str | None, mode: str, options: dict[str, Any]) -> bool:
    """Whether ``path`` holds a finished run of this commit, mode and options."""
    if commit is None or not path.is_file():
        return False
    try:
        prov = json.loads(path.read_text()).get("provenance", {})
    except (OSError, ValueError, AttributeError):
        return False
    return (
        prov.get("git", {}).get("commit") == commit
        and prov.get("mode") == mode
        and prov.get("options", {}) == options
    )


def _options(name: str, config: ReproduceAllConfig) -> dict[str, Any]:
    """The settings of experiment ``name`` that differ from its defaults (JSON-ready)."""
    if name == "fig5" and config.fig5_max_targets is not None:
        return {"max_targets": int(config.fig5_max_targets)}
    return {}


def run_all(
    experiments: Mapping[str, ModuleType],
    config: ReproduceAllConfig,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Run every experiment in ``experiments`` (name -> module with ``run``) as ``config`` says.

    Returns ``{name: {"status": "ran" | "skipped" | "failed", "seconds": float, "path": str}}``;
    a failure (missing data, an exception) is logged, written to ``out/<name>/error.txt`` and
    does not stop the other experiments.
    """
    names = sorted(experiments) if config.only is None else list(config.only)
    unknown = [n for n in names if n not in experiments]
    if unknown:
        raise InputError(
            f"unknown experiment(s) {unknown}; available: {', '.join(sorted(experiments))}"
        )
    git = git_state()
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        out = config.out / name
        path = out / "metrics.json"
        options = _options(name, config)
        if not config.force and _done(path, git["commit"], config.mode, options):
            log(f"[reproduce all] {name}: metrics.json is from {git['commit']}, skipped")
            results[name] = {"status": "skipped", "seconds": 0.0, "path": str(path)}
            continue
        out.mkdir(parents=True, exist_ok=True)
        quick = config.mode == "quick"
        log(f"[reproduce all] {name}: running ({config.mode})")
        start_machine = machine()
        t0 = time.perf_counter()
        try:
            extra = {}
            if options:  # only fig5 has options (see _options)
                from .fig5 import Fig5Config

                extra["config"] = Fig5Config(**options)
            metrics = experiments[name].run(
                data_dir=config.data_dir, out=out, quick=quick, progress=config.progress, **extra
            )
        except Exception:  # noqa: BLE001 - one experiment's failure must not stop the rest
            seconds = time.perf_counter() - t0
            (out / "error.txt").write_text(traceback.format_exc())
            log(f"[reproduce all] {name}: FAILED after {seconds:.0f} s, see {out / 'error.txt'}")
            results[name] = {"status": "failed", "seconds": seconds, "path": str(out)}
            continue
        seconds = time.perf_counter() - t0
        single = ["inflens", "reproduce", name, "--out", str(out)]
        if config.data_dir is not None:
            single += ["--data-dir", str(config.data_dir)]
        if quick:
            single.append("--quick")
        for key, value in options.items():
            single += ["--" + key.replace("_", "-"), str(value)]
        provenance = {
            "experiment": name,
            "mode": config.mode,
            "options": options,
            "git": git,
            "command": config.command,
            "equivalent_command": shlex.join(single),
            "versions": versions(),
            "wall_seconds": round(seconds, 1),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": start_machine,
        }
        full = {**metrics, "provenance": provenance}
        path.write_text(json.dumps(full, indent=1, default=_jsonable))
        err = out / "error.txt"
        if err.exists():
            err.unlink()
        log(f"[reproduce all] {name}: done in {seconds:.0f} s -> {path}")
        results[name] = {"status": "ran", "seconds": seconds, "path": str(path)}
    return results


def _jsonable(obj: Any) -> Any:
    """numpy scalars/arrays, tensors and paths as JSON values."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _summary(values: list[Any]) -> dict[str, Any]:
    nums = [
        float(v)
        for v in values
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]
    out: dict[str, Any] = {"list_length": len(values)}
    if nums and len(nums) == len(values):
        out.update(
            min=min(nums), max=max(nums), mean=sum(nums) / len(nums), first=nums[:5], last=nums[-5:]
        )
    return out


def compact(obj: Any, max_list: int = MAX_LIST) -> Any:
    """``obj`` with every list longer than ``max_list`` replaced by a summary dict.

    The summary keeps the length and, for numeric lists, min / max / mean and the first and last
    five values, so a committed metrics file stays small and still states the quoted scalars.
    """
    if isinstance(obj, dict):
        return {k: compact(v, max_list) for k, v in obj.items()}
    if isinstance(obj, list):
        if len(obj) > max_list:
            return _summary(obj)
        return [compact(v, max_list) for v in obj]
    return obj


def export(run_dir: Path, docs_dir: Path, names: Iterable[str] | None = None) -> list[Path]:
    """Write ``compact(run_dir/<name>/metrics.json)`` to ``docs_dir/<name>/metrics.json``.

    Only runs with provenance are exported (an interrupted run's bare ``metrics.json`` is not).
    """
    written = []
    for src in sorted(run_dir.glob("*/metrics.json")):
        name = src.parent.name
        if names is not None and name not in set(names):
            continue
        metrics = json.loads(src.read_text())
        if "provenance" not in metrics:
            continue
        dst = docs_dir / name / "metrics.json"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(json.dumps(compact(metrics), indent=1, sort_keys=False) + "\n")
        written.append(dst)
    return written

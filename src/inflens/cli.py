"""Command line: ``inflens demo`` and ``inflens reproduce NAME``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


def _experiments() -> dict[str, ModuleType]:
    """Experiment modules in :mod:`inflens.experiments` by their ``NAME``."""
    from . import experiments

    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(experiments.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{experiments.__name__}.{info.name}")
        name = getattr(mod, "NAME", None)
        if name and callable(getattr(mod, "run", None)):
            found[name] = mod
    return found


def default_data_dir() -> Path | None:
    """``INFLENS_DATA`` if set, else ``../shared/data`` next to the current folder if present."""
    env = os.environ.get("INFLENS_DATA")
    if env:
        return Path(env)
    guess = Path.cwd().parent / "shared" / "data"
    return guess if guess.is_dir() else None


THREADS_HELP = (
    "torch intra-op threads (default: torch's choice); 1 is often much faster for small "
    "problems on a machine shared with other jobs"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="inflens",
        description="Influence functions for PyTorch models (Koh & Liang, ICML 2017).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="explain a misclassified digit (scikit-learn digits, 10-class logistic regression)",
    )
    demo.add_argument(
        "--model",
        choices=("logreg", "gpt2-tiny"),
        default="logreg",
        help="logreg: the digits demo; gpt2-tiny: a small GPT-2 trained here on the Python "
        "language reference, per-token influence and a fine-tuning check (needs transformers)",
    )
    demo.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default inflens-demo, or inflens-demo-gpt2 with --model gpt2-tiny)",
    )
    demo.add_argument("--loo", type=int, default=40, help="points to check by retraining")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--threads", type=int, default=None, help=THREADS_HELP)

    rep = sub.add_parser("reproduce", help="reproduce a figure of the paper on real data")
    rep.add_argument("name", help="experiment name (see `inflens reproduce list`)")
    rep.add_argument("--data-dir", type=Path, default=None, help="folder with the data sets")
    rep.add_argument("--out", type=Path, default=None, help="output folder (default runs/NAME)")
    rep.add_argument("--quick", action="store_true", help="small subsample, under a minute")
    rep.add_argument("--full", action="store_true", help="all: each experiment's default protocol")
    rep.add_argument("--force", action="store_true", help="all: re-run runs of this commit")
    rep.add_argument("--only", default=None, help="all: comma-separated experiment names")
    rep.add_argument("--export", type=Path, default=None, help="all: compact metrics to this dir")
    rep.add_argument(
        "--protocol", default=None, help="fig2-cnn: reduced (default), reduced-240 or full"
    )
    rep.add_argument(
        "--max-targets",
        type=int,
        default=None,
        help="fig5: attack at most this many correctly classified test images (a seeded random "
        "sample; default all, the paper's protocol)",
    )
    rep.add_argument("--quiet", action="store_true", help="no progress bars")
    rep.add_argument("--threads", type=int, default=None, help=THREADS_HELP)

    bench = sub.add_parser("benchmark", help="attribution benchmarks (LDS) built offline here")
    bench.add_argument("name", help="benchmark name (see `inflens benchmark list`)")
    bench.add_argument("--data-dir", type=Path, default=None, help="folder with the data sets")
    bench.add_argument("--out", type=Path, default=None, help="output folder (default runs/NAME)")
    bench.add_argument("--subsets", type=int, default=100, help="retrained subsets m")
    bench.add_argument("--workers", type=int, default=None, help="retraining processes")
    bench.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.add_argument("--threads", type=int, default=None, help=THREADS_HELP)

    from .explain import add_parser as add_explain_parser

    add_explain_parser(sub, THREADS_HELP)

    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "explain":
        from .explain import main as explain_main

        return explain_main(args)
    if args.command == "benchmark":
        return _benchmark(args)
    if args.command == "demo":
        if args.model == "gpt2-tiny":
            from .experiments.gpt2_demo import main as gpt2_demo_main

            return gpt2_demo_main(args)
        from .experiments.demo import run_demo

        out = args.out or Path("inflens-demo")
        run_demo(out=out, n_loo=args.loo, seed=args.seed, progress=not args.quiet)
        return 0

    exps = _experiments()
    if args.name == "list":
        for name in sorted(exps):
            print(f"{name:14s} {getattr(exps[name], 'DESCRIPTION', '')}")
        return 0
    if args.name == "all":
        return _reproduce_all(args, exps)
    if args.name not in exps:
        print(
            f"inflens: unknown experiment {args.name!r}; available: {', '.join(sorted(exps))}",
            file=sys.stderr,
        )
        return 2
    data_dir = args.data_dir or default_data_dir()
    out = args.out or Path("runs") / args.name
    out.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {} if args.protocol is None else {"protocol": args.protocol}
    if args.max_targets is not None:
        if args.name != "fig5":
            print("inflens: --max-targets applies to fig5 only", file=sys.stderr)
            return 2
        from .experiments.fig5 import Fig5Config

        extra["config"] = Fig5Config(max_targets=args.max_targets)
    metrics = exps[args.name].run(
        data_dir=data_dir, out=out, quick=args.quick, progress=not args.quiet, **extra
    )
    print(json.dumps(metrics, indent=2, default=str)[:4000])
    print(f"figures and metrics.json written to {out}/")
    return 0


def _reproduce_all(args: argparse.Namespace, exps: dict[str, ModuleType]) -> int:
    """``inflens reproduce all``: see :mod:`inflens.experiments.reproduce_all`."""
    from .errors import InputError
    from .experiments import reproduce_all as ra

    if args.quick and args.full:
        print("inflens: give --quick or --full, not both", file=sys.stderr)
        return 2
    try:
        config = ra.ReproduceAllConfig(
            out=args.out or Path("runs") / "all",
            mode="quick" if args.quick else "full",
            only=tuple(args.only.split(",")) if args.only else None,
            force=args.force,
            data_dir=args.data_dir or default_data_dir(),
            progress=not args.quiet,
            fig5_max_targets=args.max_targets,
        )
        results = ra.run_all(exps, config)
    except InputError as exc:
        print(f"inflens: {exc}", file=sys.stderr)
        return 2
    if args.export is not None:
        for path in ra.export(config.out, args.export, names=results):
            print(f"exported {path}")
    for name, res in results.items():
        print(f"{name:14s} {res['status']:8s} {res['seconds']:8.1f} s  {res['path']}")
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


def _benchmark(args: argparse.Namespace) -> int:
    """``inflens benchmark NAME``: see :mod:`inflens.experiments.lds_bench`."""
    from .errors import InputError
    from .experiments import lds_bench

    if args.name == "list":
        for name, text in lds_bench.BENCHMARKS.items():
            print(f"{name:14s} {text}")
        return 0
    try:
        methods = tuple(args.methods.split(",")) if args.methods else None
        config = lds_bench.BenchmarkConfig(
            args.name,
            n_subsets=args.subsets,
            workers=args.workers,
            methods=methods,
            progress=not args.quiet,
        )
    except InputError as exc:
        print(f"inflens: {exc}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / args.name
    try:
        summary = lds_bench.run_benchmark(config, args.data_dir or default_data_dir(), out)
    except lds_bench.DataMissing as exc:
        print(f"inflens benchmark {args.name}: skipped: {exc}", file=sys.stderr)
        return 0
    print((out / "lds_table.md").read_text())
    gt = summary["ground_truth"]
    print(
        f"ground truth: {gt['retrained']} models retrained in {gt['seconds']:.1f} s, "
        f"{gt['reused']} reused; total {summary['total_seconds']:.1f} s; written to {out}/"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``inflens demo --model gpt2-tiny``: explain a small GPT-2's test sequence through its training text.

Everything is built here, nothing is downloaded:

- **Corpus.** The Python language reference as CPython ships it (``pydoc_data.topics``, the text
  behind ``help("assert")``: 79 topics, about 465,000 characters in Python 3.11), lower-cased and
  split into words and the punctuation ``. , ( )``; windows of ``seq_len`` consecutive words
  inside one topic are the sequences (each remembers its topic). The text differs a little
  between Python versions, so the numbers do too.
- **Tokenizer.** A word-level vocabulary: the ``vocab_size - 1`` most frequent words plus
  ``<unk>`` (:class:`WordTokenizer`).
- **Model.** A Hugging Face ``GPT2LMHeadModel`` from a ``GPT2Config`` (2 layers, ``n_embd`` 64,
  4 heads, untied input and output embeddings, no dropout), float32, trained with
  :func:`inflens.train.fit_adam` on ``loss="causal_lm"``.
- **Influence.** ``curvature="ggn"`` with damping, EK-FAC by default, on theta = every weight
  and bias except the LayerNorms' (see :data:`EXCLUDED` for why). For the test sequence: the
  most helpful and harmful training sequences with per-token terms
  (:meth:`inflens.Influence.token_influence`), shown in the terminal and in an HTML report.
- **Retraining check.** The model is not at a minimum (a few hundred Adam steps), so exact
  leave-one-out is not what influence predicts; the check is the one that fits a network
  (Bae et al. 2022, "proximal Bregman response"): fine-tune from theta-hat for a fixed number of
  Adam steps with every training sequence and, with the same seed and the same mini-batches,
  without a group of sequences (their weight set to 0), and compare the change of the test loss
  with the predicted change ``sum_{i in group} -I_up,loss(z_i, z_test) / n``. Groups: the
  ``k`` most helpful, the ``k`` most harmful and random ``k``-subsets. The correlation is
  reported as measured; for a non-convex model trained briefly it is weaker than the convex
  demo's.

Sign convention (:mod:`inflens.influence`): ``I_up,loss < 0`` = helpful; the predicted change
``-I_up,loss / n > 0`` means removing the sequence would raise the test loss.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import Influence, Objective
from ..errors import InputError
from ..train import AdamConfig, AdamStart, fit_adam, loo_weights
from ..validate import correlations

#: parameters left out of theta: LayerNorm gains and biases. EK-FAC has no Kronecker factors for
#: them and falls back to their exact Gauss-Newton diagonal, which currently costs one backward
#: pass per example per chunk (measured: 11 s per 100 sequences of this model, against 5 s for
#: the whole Kronecker-factored rest of 1,500); they are 640 of 153,344 parameters.
EXCLUDED = ("ln_",)

_WORD = re.compile(r"[a-z]+|[.,()]")


# ---------------------------------------------------------------------------- data
def corpus() -> list[tuple[str, list[str]]]:
    """``(topic, words)`` for every topic of the language reference shipped with CPython."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise InputError(
            "this Python has no pydoc_data.topics (the language reference text the demo trains "
            "on); use a python.org or distribution build that includes it"
        ) from exc
    return [(k, _WORD.findall(topics[k].lower())) for k in sorted(topics)]


class WordTokenizer:
    """Word-level tokenizer: the ``size - 1`` most frequent words, id 0 = ``<unk>``.

    Ties in frequency are broken alphabetically so that the vocabulary is deterministic.
    """

    def __init__(self, texts: list[list[str]], size: int) -> None:
        if size < 2:
            raise InputError(f"vocab_size must be at least 2, got {size}")
        counts = collections.Counter(w for words in texts for w in words)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        self.vocab = ["<unk>"] + [w for w, _ in ranked[: size - 1]]
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def encode(self, words: list[str]) -> list[int]:
        """Token ids of a list of words (unknown words -> 0)."""
        return [self.index.get(w, 0) for w in words]

    def decode(self, ids: torch.Tensor | list[int]) -> list[str]:
        """The words of a sequence of token ids."""
        return [self.vocab[int(i)] for i in ids]


@dataclass(frozen=True)
class Sequences:
    """Token windows with their topics, split into training and test sets."""

    train: torch.Tensor  # [n_train, T] token ids
    test: torch.Tensor  # [n_test, T]
    train_topics: list[str]
    test_topics: list[str]
    tokenizer: WordTokenizer


def make_sequences(
    vocab_size: int, seq_len: int, n_train: int, n_test: int, seed: int, stride: int | None = None
):
    """``seq_len``-word windows inside each topic, split at random (``seed``).

    Windows start every ``stride`` words (default ``seq_len``: no overlap). A smaller stride
    gives more, overlapping windows (then test windows share words with training windows).
    """
    stride = seq_len if stride is None else int(stride)
    if stride < 1:
        raise InputError(f"stride must be a positive integer, got {stride}")
    topics = corpus()
    tok = WordTokenizer([w for _, w in topics], vocab_size)
    windows, names = [], []
    for name, words in topics:
        ids = tok.encode(words)
        for s in range(0, len(ids) - seq_len + 1, stride):
            windows.append(ids[s : s + seq_len])
            names.append(name)
    if n_train + n_test > len(windows):
        raise InputError(
            f"the corpus has {len(windows)} windows of {seq_len} words (stride {stride}); "
            f"n_train + n_test = {n_train + n_test} is too many: lower them or the stride"
        )
    perm = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    data = torch.tensor(windows, dtype=torch.long)[perm]
    order = perm.tolist()
    return Sequences(
        train=data[:n_train],
        test=data[n_train : n_train + n_test],
        train_topics=[names[i] for i in order[:n_train]],
        test_topics=[names[i] for i in order[n_train : n_train + n_test]],
        tokenizer=tok,
    )


# ---------------------------------------------------------------------------- model
def tiny_gpt2(vocab_size: int, seq_len: int, n_embd: int, n_layer: int, n_head: int, seed: int):
    """A ``GPT2LMHeadModel`` from a config (random init under ``seed``, no dropout)."""
    try:
        import transformers
    except ImportError as exc:
        raise InputError(
            "the GPT-2 demo needs Hugging Face transformers: pip install 'inflens[hf]'"
        ) from exc
    cfg = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def theta_names(model: torch.nn.Module) -> list[str]:
    """The parameters the demo explains: all but those matching :data:`EXCLUDED`."""
    return [n for n, _ in model.named_parameters() if not any(e in n for e in EXCLUDED)]


# ---------------------------------------------------------------------------- config
@dataclass(frozen=True)
class GPT2DemoConfig:
    """Settings of :func:`run_gpt2_demo` (validated on creation).

    Attributes:
        vocab_size, seq_len: word vocabulary (with ``<unk>``) and tokens per sequence.
        n_train, n_test: sequences in each split.
        n_embd, n_layer, n_head: the GPT-2 shape.
        train_steps, batch_size, lr: Adam training from the random init.
        l2: weight of ``(l2/2)||theta||^2`` in the objective (training and influence).
        damping: added to the Gauss-Newton matrix.
        solver: ``"ekfac"`` (default), ``"kfac"``, ``"cg"`` or any name inflens accepts.
        finetune_steps, finetune_lr: the retraining check's fine-tuning from theta-hat.
        group_sizes: ``k`` of the removed groups (top-k helpful, top-k harmful, random k).
        random_groups: random groups per ``k``.
        top: training sequences shown per side.
        test_index: the test sequence to explain (``None``: the one with the median loss).
        seed: data split, initialisation and mini-batch order.
        progress: progress bars.
    """

    vocab_size: int = 400
    seq_len: int = 32
    n_train: int = 1500
    n_test: int = 200
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    train_steps: int = 300
    batch_size: int = 32
    lr: float = 5e-3
    l2: float = 1e-4
    damping: float = 1e-3
    solver: str = "ekfac"
    finetune_steps: int = 100
    finetune_lr: float = 1e-3
    group_sizes: tuple[int, ...] = (10, 50, 150)
    random_groups: int = 2
    top: int = 5
    test_index: int | None = None
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        ints = ("vocab_size", "seq_len", "n_train", "n_test", "n_embd", "n_layer", "n_head",
                "train_steps", "batch_size", "finetune_steps", "top")  # fmt: skip
        for name in ints:
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise InputError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if not (self.lr > 0 and self.finetune_lr > 0 and self.l2 >= 0 and self.damping >= 0):
            raise InputError("need lr > 0, finetune_lr > 0, l2 >= 0 and damping >= 0")
        if not self.group_sizes or any(k < 1 or 2 * k >= self.n_train for k in self.group_sizes):
            raise InputError(
                f"group_sizes must be positive and below n_train / 2, got {self.group_sizes}"
            )
        if self.test_index is not None and not 0 <= self.test_index < self.n_test:
            raise InputError(f"test_index must lie in [0, {self.n_test}), got {self.test_index}")


# ---------------------------------------------------------------------------- presentation
def _mark(words: list[str], terms: np.ndarray, colour: bool, k: int = 3) -> str:
    """Words with the ``k`` most helpful tokens (most negative terms) and the ``k`` most harmful
    (most positive) highlighted: blue / red backgrounds with ANSI colours, else ``[word]``
    (helpful) and ``{word}`` (harmful)."""
    neg = [int(i) for i in np.argsort(terms)[:k] if terms[i] < 0]
    pos = [int(i) for i in np.argsort(-terms)[:k] if terms[i] > 0]
    out = []
    for t, w in enumerate(words):
        if t in neg:
            out.append(f"\x1b[44;97m{w}\x1b[0m" if colour else f"[{w}]")
        elif t in pos:
            out.append(f"\x1b[41;97m{w}\x1b[0m" if colour else f"{{{w}}}")
        else:
            out.append(w)
    return " ".join(out)


def _use_colour() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


def _report(out: Path, result: dict[str, Any], seqs: Sequences, test_row: int) -> Path:
    """The HTML report (:func:`inflens.report.render_report`), tokens highlighted."""
    from ..report import Certificate, Example, Explanation, ReportInfo, Scored, render_report

    tok = seqs.tokenizer

    def example(row: int, split: str, terms: list[float] | None) -> Example:
        ids = (seqs.train if split == "train" else seqs.test)[row]
        topic = (seqs.train_topics if split == "train" else seqs.test_topics)[row]
        return Example(
            index=row,
            label=f"topic {topic!r}",
            kind="text",
            tokens=tuple(tok.decode(ids)),
            token_scores=None if terms is None else tuple(terms),
        )

    def scored(rows: list[dict[str, Any]]) -> tuple[Scored, ...]:
        return tuple(
            Scored(
                example(r["train_index"], "train", r["token_terms"]),
                r["influence"],
                r["predicted_change"],
            )  # fmt: skip
            for r in rows
        )

    t = result["test"]
    expl = Explanation(
        test=example(test_row, "test", t["token_terms_of_top_helpful"]),
        predicted="next words (causal LM); token shading: effect of the most helpful sequence",
        loss=t["loss"],
        helpful=scored(result["helpful"]),
        harmful=scored(result["harmful"]),
    )
    chk = result["retraining_check"]
    cert = Certificate(
        method=(
            f"fine-tuning {chk['finetune_steps']} Adam steps from theta-hat without each group "
            "vs with all sequences (same seed, same mini-batches): actual against predicted "
            "change of the test loss"
        ),
        pearson=chk["pearson"],
        spearman=chk["spearman"],
        n_points=len(chk["groups"]),
        rows=tuple((g["group"], g["actual"], g["predicted"]) for g in chk["groups"]),
        columns=("actual change", "predicted change"),
        note=chk["note"],
    )
    s = result["settings"]
    info = ReportInfo(
        title="inflens: tiny GPT-2 on the Python language reference",
        summary=(
            ("model", f"GPT-2, {s['n_layer']} layers, n_embd {s['n_embd']}, p = {result['p']}"),
            (
                "data",
                f"{s['n_train']} training / {s['n_test']} test sequences of "
                f"{s['seq_len']} words, vocabulary {s['vocab_size']}",
            ),
            (
                "influence",
                f"{s['solver']} on the Gauss-Newton matrix, damping {s['damping']}, l2 {s['l2']}",
            ),
            (
                "token shading",
                "blue = the token makes the sequence helpful (negative term), "
                "red = harmful; per-token terms sum to the sequence's I_up,loss",
            ),
        ),  # fmt: skip
        settings=tuple((k, str(v)) for k, v in s.items()),
        certificate=cert,
        outlier_note="Self-influence is not computed by this demo.",
    )
    return render_report([expl], out / "report", info)


# ---------------------------------------------------------------------------- the demo
def run_gpt2_demo(config: GPT2DemoConfig, out: Path = Path("inflens-demo-gpt2")) -> dict[str, Any]:
    """Train the tiny GPT-2, explain one test sequence, check the scores by fine-tuning.

    Prints a summary, writes ``out/metrics.json`` (every printed number) and
    ``out/report/index.html``; returns the metrics.
    """
    t0 = time.perf_counter()
    cfg = config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seqs = make_sequences(cfg.vocab_size, cfg.seq_len, cfg.n_train, cfg.n_test, cfg.seed)
    xtr, xte = seqs.train, seqs.test
    model = tiny_gpt2(cfg.vocab_size, cfg.seq_len, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    names = theta_names(model)
    # labels = input ids: the causal_lm loss shifts them by one position
    obj = Objective(model, "causal_lm", l2=cfg.l2, params=names)
    adam = AdamConfig(cfg.train_steps, cfg.batch_size, cfg.lr, seed=cfg.seed,
                      log_every=max(cfg.train_steps // 5, 1), progress=cfg.progress)  # fmt: skip
    fit = fit_adam(obj, (xtr, xtr), adam)
    obj.load_into_model(fit.theta)
    t_train = time.perf_counter() - t0
    obj = Objective(model, "causal_lm", l2=cfg.l2, params=names)
    theta_hat = obj.theta.clone()
    with torch.no_grad():
        test_losses = obj.losses(theta_hat, xte, xte)
        train_loss = float(obj.losses(theta_hat, xtr, xtr).mean())
    # a typical sequence: the lowest-loss ones are lists of method names "( ) ," that any
    # punctuation-heavy window explains
    median = int(test_losses.argsort()[len(test_losses) // 2])
    row = median if cfg.test_index is None else int(cfg.test_index)
    test = (xte[row : row + 1], xte[row : row + 1])

    t1 = time.perf_counter()
    inf = Influence(obj, (xtr, xtr), solver=cfg.solver, damping=cfg.damping, curvature="ggn",
                    progress=cfg.progress).fit()  # fmt: skip
    t_fit = time.perf_counter() - t1
    t1 = time.perf_counter()
    scores = inf.loss_influence(test)[0]  # [n]
    t_score = time.perf_counter() - t1
    n = inf.n
    change = (-scores / n).numpy()
    order = np.argsort(scores.numpy())  # ascending: most helpful (most negative) first
    by_harm = order[::-1].copy()
    helpful, harmful = order[: cfg.top], by_harm[: cfg.top]
    t1 = time.perf_counter()
    shown = np.concatenate([helpful, harmful])
    terms = inf.token_influence(test, torch.as_tensor(shown))[0].numpy()  # [2 top, T]
    test_terms = inf.token_influence(test, [int(helpful[0])], side="test")[0, 0].numpy()
    t_tokens = time.perf_counter() - t1
    token_sum_err = float(np.abs(terms.sum(1) - scores.numpy()[shown]).max())

    def rows(idx: np.ndarray, offset: int) -> list[dict[str, Any]]:
        return [
            {
                "train_index": int(i),
                "topic": seqs.train_topics[int(i)],
                "influence": float(scores[int(i)]),
                "predicted_change": float(change[int(i)]),
                "token_terms": [float(v) for v in terms[offset + j]],
            }
            for j, i in enumerate(idx)
        ]

    helpful_rows, harmful_rows = rows(helpful, 0), rows(harmful, len(helpful))
    topic = seqs.test_topics[row]
    same = np.array([t == topic for t in seqs.train_topics])
    top10 = order[:10]
    topic_stats = {
        "test_topic": topic,
        "share_of_training_sequences_from_it": float(same.mean()),
        "share_of_10_most_helpful_from_it": float(same[top10].mean()),
    }

    # ------------------------------------------------------------- retraining check
    t1 = time.perf_counter()
    ft = AdamConfig(cfg.finetune_steps, cfg.batch_size, cfg.finetune_lr, seed=cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 2)

    def finetuned_loss(weights: torch.Tensor | None) -> float:
        th = fit_adam(obj, (xtr, xtr), ft, start=AdamStart(theta_hat, fit.state), weights=weights)
        with torch.no_grad():
            return float(obj.losses(th.theta, *test)[0])

    base = finetuned_loss(None)
    groups = []
    for k in cfg.group_sizes:
        sets = [(f"top-{k} helpful", order[:k]), (f"top-{k} harmful", by_harm[:k])]
        sets += [(f"random {k} #{r + 1}", torch.randperm(n, generator=gen)[:k].numpy())
                 for r in range(cfg.random_groups)]  # fmt: skip
        for label, idx in sets:
            actual = finetuned_loss(loo_weights(n, torch.as_tensor(idx), obj.dtype)) - base
            groups.append(
                {
                    "group": label,
                    "size": int(k),
                    "predicted": float(change[idx].sum()),
                    "actual": float(actual),
                }  # fmt: skip
            )
    t_check = time.perf_counter() - t1
    corr = correlations([g["actual"] for g in groups], [g["predicted"] for g in groups])
    signs = [np.sign(g["actual"]) == np.sign(g["predicted"]) for g in groups]
    check = {
        "finetune_steps": cfg.finetune_steps,
        "finetune_lr": cfg.finetune_lr,
        "test_loss_after_finetuning_all": base,
        "groups": groups,
        "pearson": corr["pearson"],
        "spearman": corr["spearman"],
        "slope_predicted_on_actual": corr["slope"],
        "sign_agreement": float(np.mean(signs)),
        "note": (
            "Predicted = sum over the group of -I_up,loss/n (first order, additive); actual = "
            "test loss after fine-tuning without the group minus after fine-tuning with all "
            "sequences. A few hundred Adam steps do not reach a minimum, so neither number is "
            "exact leave-one-out retraining."
        ),
    }
    d = inf.diagnostics()
    result: dict[str, Any] = {
        "experiment": "gpt2-tiny demo",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "model_parameters": int(n_params),
        "p": int(obj.p),
        "excluded_from_theta": [nm for nm, _ in model.named_parameters() if nm not in names],
        "dtype": str(obj.dtype),
        "backend": d.get("backend"),
        "train_losses_every_fifth": fit.state["losses"],
        "train_loss": train_loss,
        "test_loss_mean": float(test_losses.mean()),
        "test": {
            "index": row,
            "topic": topic,
            "loss": float(test_losses[row]),
            "text": " ".join(seqs.tokenizer.decode(xte[row])),
            "token_terms_of_top_helpful": [float(v) for v in test_terms],
        },
        "helpful": helpful_rows,
        "harmful": harmful_rows,
        "topic_check": topic_stats,
        "token_sum_max_abs_error": token_sum_err,
        "retraining_check": check,
        "seconds": {
            "train": t_train,
            "influence_fit": t_fit,
            "scoring": t_score,
            "token_influence": t_tokens,
            "retraining_check": t_check,
        },
    }
    report = _report(out, result, seqs, row)
    result["seconds"]["total"] = time.perf_counter() - t0
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    _print(result, seqs, terms, test_terms, report)
    return result


def _print(result, seqs: Sequences, terms, test_terms, report: Path) -> None:
    colour = _use_colour()
    s, t, tok = result["settings"], result["test"], seqs.tokenizer
    sec = result["seconds"]
    lines = [
        f"inflens demo --model gpt2-tiny: GPT-2 ({s['n_layer']} layers, n_embd {s['n_embd']}, "
        f"{result['model_parameters']} parameters) on the Python language reference "
        f"(pydoc_data, Python {result['python']}): {s['n_train']} training / {s['n_test']} test "
        f"sequences of {s['seq_len']} words, vocabulary {s['vocab_size']}",
        f"trained {s['train_steps']} Adam steps in {sec['train']:.1f} s: train loss "
        f"{result['train_loss']:.4f}, mean test loss {result['test_loss_mean']:.4f}",
        f"influence: {s['solver']} on the Gauss-Newton matrix, damping {s['damping']}, l2 "
        f"{s['l2']}, p = {result['p']} (LayerNorms frozen), {result['dtype']}, backend "
        f"{result['backend']}; fit {sec['influence_fit']:.1f} s, scoring {sec['scoring']:.1f} s",
        "",
        f"test sequence #{t['index']} (topic {t['topic']!r}, loss {t['loss']:.4f}); its words "
        "most helped by the most helpful training sequence are marked:",
        "  " + _mark(tok.decode(seqs.test[t["index"]]), np.asarray(test_terms), colour),
        "",
        "predicted change = change of the test loss if the sequence were removed (-I_up,loss/n);"
        " positive = it helped. Marked tokens: "
        + (
            "blue = most helpful, red = most harmful"
            if colour
            else "[helpful] and {harmful}, the 3 largest per-token terms of each sign"
        ),  # fmt: skip
    ]
    k = len(result["helpful"])
    for kind, rows_, off in (("helpful", result["helpful"], 0), ("harmful", result["harmful"], k)):
        for j, r in enumerate(rows_):
            words = tok.decode(seqs.train[r["train_index"]])
            lines.append(
                f"{kind} #{r['train_index']:<5d} {r['predicted_change']:+.3e}  topic {r['topic']!r}"
            )
            lines.append("    " + _mark(words, terms[off + j], colour))
    tc, chk = result["topic_check"], result["retraining_check"]
    lines += [
        "",
        f"topic check: {100 * tc['share_of_10_most_helpful_from_it']:.0f}% of the 10 most "
        f"helpful sequences come from the test sequence's topic, which holds "
        f"{100 * tc['share_of_training_sequences_from_it']:.1f}% of the training sequences",
        f"per-token terms sum to the sequence scores (max abs error "
        f"{result['token_sum_max_abs_error']:.1e})",
        "",
        f"retraining check: fine-tune {chk['finetune_steps']} Adam steps from theta-hat without "
        "each group vs with all (same seed and batches):",
        f"  {'group':22s}{'predicted':>13s}{'actual':>13s}",
    ]
    lines += [
        f"  {g['group']:22s}{g['predicted']:>+13.3e}{g['actual']:>+13.3e}" for g in chk["groups"]
    ]
    lines += [
        f"  Pearson R {chk['pearson']:.3f}, Spearman {chk['spearman']:.3f}, signs agree "
        f"{100 * chk['sign_agreement']:.0f}% over {len(chk['groups'])} groups "
        f"({sec['retraining_check']:.1f} s)",
        "",
        f"report: {report}; metrics: {report.parent.parent / 'metrics.json'}; "
        f"total {sec['total']:.1f} s",
    ]
    print("\n".join(lines))


def main(args: Any) -> int:
    """``inflens demo --model gpt2-tiny`` (called by :mod:`inflens.cli`)."""
    cfg = GPT2DemoConfig(seed=args.seed, progress=not args.quiet)
    run_gpt2_demo(cfg, args.out or Path("inflens-demo-gpt2"))
    return 0

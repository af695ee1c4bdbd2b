"""``inflens explain``: every model and data format, row selection, resume, and bad inputs.

Ground truth for the numbers: an explicit float64 Hessian of the tiny model's risk from
``torch.func.hessian`` and ``I_up,loss = -grad L(z_test)^T H^-1 (grad L(z_i) + l2 theta)`` formed
by hand; every other format must give the same scores as the safetensors + factory path on the
same weights and data (the loaders only change how the files are read).
"""

from __future__ import annotations

import csv
import json
import re
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from inflens import cli

L2 = 0.1
D, C, N_TRAIN, N_TEST = 4, 3, 40, 12

FACTORY_SRC = """
import torch
from torch import nn


def linear(d=4, c=3):
    return nn.Linear(d, c).double()


def image_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).double()
"""


@pytest.fixture()
def factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user's own module on sys.path with the architecture factories."""
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "explain_factories.py").write_text(FACTORY_SRC)
    monkeypatch.syspath_prepend(str(pkg))
    yield "explain_factories:linear"
    sys.modules.pop("explain_factories", None)


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_TEST, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, C, generator=g, dtype=torch.float64)
    y = (x @ w + 0.8 * torch.randn(N_TRAIN + N_TEST, C, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Linear(D, C).double()
    return model, x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def _write_npz(path: Path, x: torch.Tensor, y: torch.Tensor, **extra) -> Path:
    np.savez(path, X=x.numpy(), y=y.numpy(), **extra)
    return path


@pytest.fixture()
def files(tmp_path: Path, factory: str):
    model, xtr, ytr, xte, yte = _problem()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    return {
        "model": model,
        "xtr": xtr,
        "ytr": ytr,
        "xte": xte,
        "yte": yte,
        "weights": tmp_path / "model.safetensors",
        "train": _write_npz(tmp_path / "train.npz", xtr, ytr),
        "test": _write_npz(tmp_path / "test.npz", xte, yte),
        "factory": factory,
    }


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(["explain", "--quiet", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _scores(out: Path) -> tuple[torch.Tensor, list[int]]:
    t = load_file(str(out / "scores.safetensors"))
    return t["scores"], t["test_rows"].tolist()


def _reference_scores(model: nn.Module, xtr, ytr, xte, yte, l2: float) -> torch.Tensor:
    """``-grad L(z_test)^T H^-1 (grad L(z_i) + l2 theta)`` from an explicit float64 Hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(t):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            out[n] = t[i : i + k].reshape(s)
            i += k
        return out

    def loss(t, x, y):
        out = torch.func.functional_call(model, unflat(t), (x,))
        return nn.functional.cross_entropy(out, y, reduction="none")

    risk = lambda t: loss(t, xtr, ytr).mean() + 0.5 * l2 * (t * t).sum()  # noqa: E731
    h = torch.func.hessian(risk)(theta)
    per = torch.func.vmap(
        torch.func.grad(lambda t, x, y: loss(t, x[None], y[None])[0]), (None, 0, 0)
    )
    g_train = per(theta, xtr, ytr) + l2 * theta
    g_test = per(theta, xte, yte)
    return -g_test @ torch.linalg.solve(h, g_train.T)


# ---------------------------------------------------------------------------- numbers
def test_safetensors_factory_npz_matches_explicit_hessian(files, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    rc, stdout, err = _run(
        ["--model", str(files["weights"]), "--factory", files["factory"], "--train",
         str(files["train"]), "--test", str(files["test"]), "--l2", str(L2), "--out", str(out),
         "--select", "highest-loss", "--count", "4", "--certificate", "none"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    scores, rows = _scores(out)
    ref = _reference_scores(files["model"], files["xtr"], files["ytr"], files["xte"][rows],
                            files["yte"][rows], L2)  # fmt: skip
    # float64 solves of a 15x15 system with condition number < 1e3: agreement to ~1e-10
    torch.testing.assert_close(scores, ref, rtol=1e-8, atol=1e-10)
    # the rows are the 4 highest test losses
    with torch.no_grad():
        losses = nn.functional.cross_entropy(files["model"](files["xte"]), files["yte"],
                                             reduction="none")  # fmt: skip
    assert rows == torch.argsort(losses, descending=True)[:4].tolist()
    # top.csv: the most helpful row per test row is the most negative score; change = -I/n
    with open(out / "top.csv") as f:
        table = list(csv.DictReader(f))
    first = [r for r in table if r["kind"] == "helpful" and r["rank"] == "1"]
    assert [int(r["train_row"]) for r in first] == scores.argmin(1).tolist()
    for r in first:
        assert float(r["predicted_loss_change"]) == pytest.approx(-float(r["influence"]) / N_TRAIN)
    harm = [r for r in table if r["kind"] == "harmful" and r["rank"] == "1"]
    assert [int(r["train_row"]) for r in harm] == scores.argmax(1).tolist()
    html = (out / "report" / "index.html").read_text()
    assert "negative = helpful" in html and html.count('class="card explanation"') == 4
    assert "I_up,loss" in stdout


def test_digits_example_one_command(tmp_path, capsys) -> None:
    """The quick start: the demo's model and data written to files, explained, LOO-certified."""
    out = tmp_path / "digits"
    rc, stdout, err = _run(["--example", "digits", "--out", str(out), "--certificate-k", "6"],
                           capsys)  # fmt: skip
    assert rc == 0, err
    for name in ("report/index.html", "scores.safetensors", "top.csv", "explain.json",
                 "example/model.safetensors", "example/train.npz", "example/test.npz"):  # fmt: skip
        assert (out / name).is_file(), name
    metrics = json.loads((out / "explain.json").read_text())
    cert = metrics["certificate"]
    assert cert["method"] == "loo" and len(cert["actual"]) == 6
    # exact refits of a strongly convex model: the influence prediction is close (demo: 0.9999)
    assert cert["pearson"] > 0.99
    # the same misclassified digit the demo explains comes first
    assert metrics["rows"][0] == 38
    assert "inflens explain --model" in err  # the equivalent command on the user's own files


def _same_as_factory(files, tmp_path, capsys, model_args: list[str], name: str) -> None:
    base = tmp_path / "base"
    common = ["--train", str(files["train"]), "--test", str(files["test"]), "--l2", str(L2),
              "--rows", "0,5", "--certificate", "none", "--outliers", "3"]  # fmt: skip
    rc, _, err = _run(["--model", str(files["weights"]), "--factory", files["factory"],
                       *common, "--out", str(base)], capsys)  # fmt: skip
    assert rc == 0, err
    other = tmp_path / name
    rc, _, err = _run([*model_args, *common, "--out", str(other)], capsys)
    assert rc == 0, err
    torch.testing.assert_close(_scores(other)[0], _scores(base)[0], rtol=1e-9, atol=1e-12)
    assert _scores(other)[1] == [0, 5]


def test_torchscript_model(files, tmp_path, capsys) -> None:
    path = tmp_path / "model.pt"
    torch.jit.script(files["model"]).save(str(path))
    _same_as_factory(files, tmp_path, capsys, ["--model", str(path)], "ts")


def test_torch_export_program(files, tmp_path, capsys) -> None:
    path = tmp_path / "model.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(files["model"], (files["xtr"][:4],),
                                  dynamic_shapes=({0: batch},))  # fmt: skip
    torch.export.save(program, str(path))
    _same_as_factory(files, tmp_path, capsys, ["--model", str(path)], "export")


def test_save_for_inflens_folder_needs_no_factory(files, tmp_path, capsys) -> None:
    from inflens.callbacks import save_for_inflens

    folder = save_for_inflens(files["model"], tmp_path / "saved", factory=files["factory"],
                              factory_kwargs={"d": D, "c": C})  # fmt: skip
    _same_as_factory(files, tmp_path, capsys, ["--model", str(folder)], "saved-out")


def test_csv_with_string_labels_and_parquet(files, tmp_path, capsys) -> None:
    import pandas as pd

    names = np.array(["cat", "dog", "eel"])  # sorted: class index = position, as in the npz
    frames = {}
    for split, x, y in (
        ("train", files["xtr"], files["ytr"]),
        ("test", files["xte"], files["yte"]),
    ):
        df = pd.DataFrame(x.numpy(), columns=[f"f{j}" for j in range(D)])
        df["animal"] = names[y.numpy()]
        df.to_csv(tmp_path / f"{split}.csv", index=False)
        frames[split] = df
    base = tmp_path / "base"
    rc, _, err = _run(["--model", str(files["weights"]), "--factory", files["factory"],
                       "--train", str(files["train"]), "--test", str(files["test"]),
                       "--l2", str(L2), "--rows", "1,2", "--out", str(base)], capsys)  # fmt: skip
    assert rc == 0, err
    out = tmp_path / "csv"
    rc, _, err = _run(["--model", str(files["weights"]), "--factory", files["factory"],
                       "--train", str(tmp_path / "train.csv"), "--test", str(tmp_path / "test.csv"),
                       "--target", "animal", "--l2", str(L2), "--rows", "1,2", "--out", str(out)],
                      capsys)  # fmt: skip
    assert rc == 0, err
    torch.testing.assert_close(_scores(out)[0], _scores(base)[0], rtol=1e-9, atol=1e-12)
    html = (out / "report" / "index.html").read_text()
    assert 'data-kind="table"' in html and "<b>f0</b>" in html and "dog" in html
    pytest.importorskip("pyarrow", reason="parquet needs pyarrow (pip install pyarrow)")
    for split, df in frames.items():
        df.to_parquet(tmp_path / f"{split}.parquet")
    out = tmp_path / "pq"
    rc, _, err = _run(["--model", str(files["weights"]), "--factory", files["factory"],
                       "--train", str(tmp_path / "train.parquet"),
                       "--test", str(tmp_path / "test.parquet"), "--target", "animal",
                       "--l2", str(L2), "--rows", "1,2", "--out", str(out)], capsys)  # fmt: skip
    assert rc == 0, err
    torch.testing.assert_close(_scores(out)[0], _scores(base)[0], rtol=1e-9, atol=1e-12)


def _image_folder(root: Path, n_per_class: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(("circle", "square")):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            a = rng.integers(0, 120, (4, 4)) + 120 * c * (np.arange(16).reshape(4, 4) % 2)
            Image.fromarray(a.astype(np.uint8), mode="L").save(root / name / f"{i:03d}.png")


def test_image_folder(tmp_path, capsys, factory) -> None:
    _image_folder(tmp_path / "train", 10, 0)
    _image_folder(tmp_path / "test", 3, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).double()
    save_file(model.state_dict(), str(tmp_path / "img.safetensors"))
    out = tmp_path / "out"
    rc, _, err = _run(["--model", str(tmp_path / "img.safetensors"),
                       "--factory", "explain_factories:image_model",
                       "--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
                       "--l2", "0.1", "--select", "highest-loss", "--count", "2", "--top", "3",
                       "--out", str(out)], capsys)  # fmt: skip
    assert rc == 0, err
    scores, rows = _scores(out)
    assert scores.shape == (2, 20)
    html = (out / "report" / "index.html").read_text()
    # 2 test images + 2 x (3 helpful + 3 harmful) + 10 outliers (capped at n = 20)
    assert html.count('data-kind="image"') == 2 + 12 + 10
    assert "square" in html and "circle" in html


def test_rows_file_and_selection(files, tmp_path, capsys) -> None:
    rows_file = tmp_path / "rows.txt"
    rows_file.write_text("# rows to explain\n3, 7\n11\n")
    common = ["--model", str(files["weights"]), "--factory", files["factory"], "--train",
              str(files["train"]), "--test", str(files["test"]), "--l2", str(L2),
              "--certificate", "none", "--outliers", "0"]  # fmt: skip
    rc, _, err = _run(
        [*common, "--rows-file", str(rows_file), "--out", str(tmp_path / "a")], capsys
    )
    assert rc == 0, err
    assert _scores(tmp_path / "a")[1] == [3, 7, 11]
    rc, _, err = _run([*common, "--select", "misclassified", "--count", "2", "--out",
                       str(tmp_path / "b")], capsys)  # fmt: skip
    assert rc == 0, err
    rows = _scores(tmp_path / "b")[1]
    with torch.no_grad():
        out = files["model"](files["xte"])
    losses = nn.functional.cross_entropy(out, files["yte"], reduction="none")
    wrong = (out.argmax(1) != files["yte"]).nonzero()[:, 0]
    expect = wrong[torch.argsort(losses[wrong], descending=True)][:2].tolist()
    assert rows == expect and len(expect) == 2


def test_resume_reuses_fitted_state(files, tmp_path, capsys) -> None:
    common = ["--model", str(files["weights"]), "--factory", files["factory"], "--train",
              str(files["train"]), "--test", str(files["test"]), "--l2", str(L2), "--rows", "2",
              "--out", str(tmp_path / "o"), "--certificate", "none"]  # fmt: skip
    assert _run(common, capsys)[0] == 0
    first = _scores(tmp_path / "o")[0]
    assert _run([*common, "--resume"], capsys)[0] == 0
    metrics = json.loads((tmp_path / "o" / "explain.json").read_text())
    assert metrics["settings"]["resumed"] == "True"
    torch.testing.assert_close(_scores(tmp_path / "o")[0], first, rtol=0, atol=0)


def test_cross_solver_certificate(files, tmp_path, capsys) -> None:
    out = tmp_path / "o"
    rc, _, err = _run(["--model", str(files["weights"]), "--factory", files["factory"],
                       "--train", str(files["train"]), "--test", str(files["test"]),
                       "--l2", str(L2), "--rows", "0", "--certificate", "solvers",
                       "--out", str(out)], capsys)  # fmt: skip
    assert rc == 0, err
    cert = json.loads((out / "explain.json").read_text())["certificate"]
    assert cert["method"] == "solvers" and cert["other"] == "cg"
    # exact vs CG(tol 1e-10) on a well-conditioned 15-parameter problem
    assert cert["pearson"] > 0.999999 and cert["relative_difference"] < 1e-6


# ---------------------------------------------------------------------------- Hugging Face
WORDS = ("[PAD] [UNK] [CLS] [SEP] [MASK] good bad great awful movie film plot acting the a was "
         "is fun boring").split()  # fmt: skip
REVIEWS = [
    ("good movie", 1), ("bad plot", 0), ("great acting", 1), ("awful film", 0),
    ("the movie was fun", 1), ("the plot was boring", 0), ("a great film", 1),
    ("boring acting", 0), ("fun plot", 1), ("the film is awful", 0),
]  # fmt: skip


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tinybert")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=32, num_labels=2,
                                  id2label={0: "negative", 1: "positive"},
                                  label2id={"negative": 0, "positive": 1})  # fmt: skip
    transformers.BertForSequenceClassification(cfg).save_pretrained(str(folder))
    return folder


def _jsonl(path: Path, records) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_hf_classifier_with_jsonl(bert_folder, tmp_path, capsys) -> None:
    train = _jsonl(tmp_path / "train.jsonl", [{"text": t, "label": y} for t, y in REVIEWS])
    test = _jsonl(tmp_path / "test.jsonl", [{"text": "good film", "label": 1},
                                            {"text": "awful plot", "label": 0}])  # fmt: skip
    out = tmp_path / "out"
    rc, _, err = _run(["--model", str(bert_folder), "--train", str(train), "--test", str(test),
                       "--params", "classifier.", "--l2", "0.01", "--damping", "0.01",
                       "--select", "highest-loss", "--count", "2", "--top", "2",
                       "--out", str(out)], capsys)  # fmt: skip
    assert rc == 0, err
    scores, rows = _scores(out)
    assert scores.shape == (2, len(REVIEWS)) and torch.isfinite(scores).all()
    html = (out / "report" / "index.html").read_text()
    assert 'data-kind="text"' in html and html.count('class="tok"') >= 2 * 4
    assert "positive" in html  # the model folder's id2label names the classes


def test_hf_datasets_folder(bert_folder, tmp_path, capsys) -> None:
    datasets = pytest.importorskip("datasets", reason="needs the datasets package")
    ds = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": [t for t, _ in REVIEWS],
                                             "label": [y for _, y in REVIEWS]}),
        "test": datasets.Dataset.from_dict({"text": ["good film", "bad movie"], "label": [1, 0]}),
    })  # fmt: skip
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    rc, _, err = _run(["--model", str(bert_folder), "--train", str(tmp_path / "ds"),
                       "--test", str(tmp_path / "ds"), "--params", "classifier.",
                       "--l2", "0.01", "--rows", "0,1", "--top", "2", "--out", str(out)],
                      capsys)  # fmt: skip
    assert rc == 0, err
    assert _scores(out)[0].shape == (2, len(REVIEWS))


def test_hf_datasets_missing_package_is_named(bert_folder, tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    rc, _, err = _run(["--model", str(bert_folder), "--train", str(tmp_path / "ds"), "--test",
                       str(tmp_path / "ds"), "--out", str(tmp_path / "o")], capsys)  # fmt: skip
    assert rc == 2 and "pip install datasets" in err


def test_hf_causal_lm_with_jsonl(tmp_path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "gpt"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(WORDS), n_positions=16, n_embd=8, n_layer=1,
                                  n_head=2, bos_token_id=2, eos_token_id=3)  # fmt: skip
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(folder))
    train = _jsonl(tmp_path / "train.jsonl", [{"text": t} for t, _ in REVIEWS])
    test = _jsonl(tmp_path / "test.jsonl", [{"text": "good plot"}, {"text": "awful movie"}])
    out = tmp_path / "out"
    rc, _, err = _run(["--model", str(folder), "--train", str(train), "--test", str(test),
                       "--params", "transformer.ln_f.", "--damping", "0.1", "--select", "highest-loss",
                       "--count", "1", "--top", "2", "--out", str(out)], capsys)  # fmt: skip
    assert rc == 0, err
    scores, rows = _scores(out)
    assert scores.shape == (1, len(REVIEWS)) and torch.isfinite(scores).all()
    # per-token highlights (Influence.token_influence) on the shown training texts: each row's
    # token terms sum to its I_up,loss (tokens aligned with the non-padding positions)
    html = (out / "report" / "index.html").read_text()
    table = html[html.index('id="helpful-1"') :]
    table = table[: table.index("</table>")]
    checked = 0
    for tr in table.split("<tr>")[2:]:
        terms = [float(v) for v in re.findall(r'class="tok" style="[^"]*" title="([^"]+)"', tr)]
        total = float(re.findall(r'data-v="([^"]+)">[^<]*</td><td class="num"', tr)[-1])
        assert terms and abs(sum(terms) - total) <= 1e-3 * sum(map(abs, terms)) + 1e-12
        checked += 1
    assert checked == 2


# ---------------------------------------------------------------------------- scikit-learn
def test_skops_logistic_regression(tmp_path, capsys) -> None:
    sio = pytest.importorskip("skops.io")
    pytest.importorskip("inflens.sklearn_bridge")
    from sklearn.linear_model import LogisticRegression

    from inflens.sklearn_bridge import from_sklearn

    _, xtr, ytr, xte, yte = _problem()
    names = np.array(["cat", "dog", "eel"])
    est = LogisticRegression(C=2.0, tol=1e-10, max_iter=1000).fit(xtr.numpy(), names[ytr.numpy()])
    sio.dump(est, tmp_path / "lr.skops")
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([f"f{j}" for j in range(D)] + ["animal"])
            for row, lab in zip(x.numpy(), names[y.numpy()]):
                w.writerow([*row.tolist(), lab])
    out = tmp_path / "out"
    rc, _, err = _run(["--model", str(tmp_path / "lr.skops"), "--train", str(tmp_path / "train.csv"),
                       "--test", str(tmp_path / "test.csv"), "--target", "animal",
                       "--rows", "0,4", "--out", str(out)], capsys)  # fmt: skip
    assert rc == 0, err
    direct = from_sklearn(est, xtr.numpy(), names[ytr.numpy()])
    ref = direct.loss_influence((xte.numpy()[[0, 4]], names[yte.numpy()[[0, 4]]]))
    torch.testing.assert_close(_scores(out)[0], ref.cpu(), rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------- bad inputs
def _error(argv: list[str], capsys) -> str:
    rc, _, err = _run(argv, capsys)
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("inflens explain: error: "), err
    return lines[0]


def test_bad_inputs_give_one_line_errors(files, tmp_path, capsys) -> None:
    m = ["--model", str(files["weights"]), "--factory", files["factory"]]
    t = ["--train", str(files["train"]), "--test", str(files["test"])]
    o = ["--out", str(tmp_path / "o"), "--l2", str(L2)]
    # a table without the named target column
    with open(tmp_path / "t.csv", "w") as f:
        f.write("a,b,c,d,label\n" + "0,1,2,3,1\n" * 3)
    msg = _error([*m, "--train", str(tmp_path / "t.csv"), "--test", str(tmp_path / "t.csv"),
                  "--target", "y", *o], capsys)  # fmt: skip
    assert "no column 'y'" in msg and "label" in msg
    # inputs of the wrong width for the model
    _write_npz(
        tmp_path / "wide.npz", torch.randn(5, D + 2, dtype=torch.float64), torch.zeros(5).long()
    )
    wide = str(tmp_path / "wide.npz")
    msg = _error([*m, "--train", wide, "--test", wide, *o], capsys)
    assert "could not process" in msg and f"{D + 2})" in msg
    # a torch.export program exported for a fixed batch size
    static = torch.export.export(files["model"], (files["xtr"][:8],))
    torch.export.save(static, str(tmp_path / "static.pt2"))
    msg = _error(["--model", str(tmp_path / "static.pt2"), *t, *o], capsys)
    assert "dynamic batch dimension" in msg
    # a label out of range (train, then test)
    _write_npz(tmp_path / "bad.npz", files["xtr"], torch.full((N_TRAIN,), 7))
    msg = _error(
        [*m, "--train", str(tmp_path / "bad.npz"), "--test", str(files["test"]), *o], capsys
    )
    assert "7" in msg and "[0, 2]" in msg
    _write_npz(tmp_path / "badt.npz", files["xte"], torch.full((N_TEST,), 5))
    msg = _error(
        [*m, "--train", str(files["train"]), "--test", str(tmp_path / "badt.npz"), *o], capsys
    )
    assert "5" in msg and "[0, 2]" in msg
    # pickles are refused, never loaded
    (tmp_path / "m.pkl").write_bytes(b"\x80\x04K\x01.")
    msg = _error(["--model", str(tmp_path / "m.pkl"), *t, *o], capsys)
    assert "unpickle" in msg and "safetensors" in msg
    torch.save(files["model"], tmp_path / "whole.pt")
    assert zipfile.is_zipfile(tmp_path / "whole.pt")
    msg = _error(["--model", str(tmp_path / "whole.pt"), *t, *o], capsys)
    assert "torch.save pickle" in msg
    np.savez(tmp_path / "obj.npz", X=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    msg = _error([*m, "--train", str(tmp_path / "obj.npz"), *t[2:], *o], capsys)
    assert "unpickling" in msg
    # missing pieces and wrong names
    msg = _error(["--model", str(files["weights"]), *t, *o], capsys)
    assert "--factory" in msg
    msg = _error([*m, *t, "--x-key", "inputs", *o], capsys)
    assert "'inputs'" in msg and "--x-key" in msg
    msg = _error([*m, *t, "--rows", "3,99", *o], capsys)
    assert "99" in msg and f"[0, {N_TEST - 1}]" in msg
    msg = _error(
        ["--model", str(files["weights"]), "--factory", "no_such_module:f", *t, *o], capsys
    )
    assert "no_such_module" in msg
    _write_npz(tmp_path / "reg.npz", files["xtr"], torch.randn(N_TRAIN, C, dtype=torch.float64))
    reg = str(tmp_path / "reg.npz")
    msg = _error([*m, "--train", reg, "--test", reg, "--select", "misclassified", *o], capsys)
    assert "highest-loss" in msg


def test_untrusted_skops_types_are_listed(tmp_path, capsys) -> None:
    sio = pytest.importorskip("skops.io")
    from sklearn.preprocessing import FunctionTransformer

    sio.dump(FunctionTransformer(func=textwrap.dedent), tmp_path / "f.skops")
    msg = _error(["--model", str(tmp_path / "f.skops"), "--train", "x.npz", "--test", "x.npz",
                  "--out", str(tmp_path / "o")], capsys)  # fmt: skip
    assert "textwrap.dedent" in msg and "will not trust" in msg

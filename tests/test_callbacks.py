"""Saving at the end of training for ``inflens explain``: plain PyTorch and the HF Trainer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from inflens import InputError, cli
from inflens.callbacks import read_checkpoints, save_checkpoint, save_for_inflens
from inflens.explain import load_model


def test_save_for_inflens_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(64, 10, bias=False).double()
    folder = save_for_inflens(model, tmp_path / "m", factory="inflens.explain:digits_model")
    meta = json.loads((folder / "inflens_model.json").read_text())
    assert (
        meta["factory"] == "inflens.explain:digits_model" and meta["weights"] == "model.safetensors"
    )
    loaded = load_model(folder)
    assert loaded.kind == "safetensors"
    torch.testing.assert_close(loaded.module.weight, model.weight, rtol=0, atol=0)
    assert loaded.module.weight.dtype == torch.float64
    with pytest.raises(InputError, match="factory"):
        save_for_inflens(model, tmp_path / "n")


def test_tied_weights_are_saved(tmp_path: Path) -> None:
    """safetensors refuses shared storage; the saved copies load back into the tied model."""
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    save_for_inflens(model, tmp_path, factory="x:y")
    state = load_file(str(tmp_path / "model.safetensors"))
    torch.testing.assert_close(state["0.weight"], state["1.weight"], rtol=0, atol=0)


def test_checkpoints_record_step_and_learning_rate(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step, lr in ((10, 0.5), (20, 0.25), (5, 1.0)):
        for g in opt.param_groups:
            g["lr"] = lr
        model.weight.data += 1.0
        save_checkpoint(model, tmp_path, step, opt.param_groups[0]["lr"])
    entries = read_checkpoints(tmp_path)
    assert [(e["step"], e["learning_rate"]) for e in entries] == [(5, 1.0), (10, 0.5), (20, 0.25)]
    last = load_file(str(tmp_path / entries[-1]["file"]))  # step 5 was saved last
    first = load_file(str(tmp_path / entries[0]["file"]))
    torch.testing.assert_close(first["weight"], model.weight.detach(), rtol=0, atol=0)
    assert not torch.equal(last["weight"], first["weight"])
    save_checkpoint(model, tmp_path, 10, 0.125)  # re-saving a step replaces its entry
    assert [e["learning_rate"] for e in read_checkpoints(tmp_path) if e["step"] == 10] == [0.125]
    with pytest.raises(InputError):
        save_checkpoint(model, tmp_path, -1, 0.1)


WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] good bad great awful movie film plot fun boring".split()
REVIEWS = [("good movie", 1), ("bad plot", 0), ("great film", 1), ("awful movie", 0),
           ("fun film", 1), ("boring plot", 0), ("good fun", 1), ("awful plot", 0)]  # fmt: skip


def _tiny_bert(folder: Path):
    transformers = pytest.importorskip("transformers")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tok = transformers.BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=16, num_labels=2)  # fmt: skip
    return transformers.BertForSequenceClassification(cfg), tok


def _jsonl(path: Path) -> Path:
    path.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in REVIEWS) + "\n")
    return path


def _explain_folder(folder: Path, tmp_path: Path, capsys) -> torch.Tensor:
    data = _jsonl(tmp_path / "reviews.jsonl")
    out = tmp_path / "explained"
    rc = cli.main(["explain", "--quiet", "--model", str(folder), "--train", str(data), "--test",
                   str(data), "--params", "classifier.", "--l2", "0.01", "--rows", "0",
                   "--top", "2", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    return load_file(str(out / "scores.safetensors"))["scores"]


def test_callback_methods_save_checkpoints_and_final_model(tmp_path: Path, capsys) -> None:
    """The callback's hooks called as Trainer calls them (no training loop)."""
    from transformers import TrainerControl, TrainerState

    from inflens.callbacks import InflensCallback

    model, tok = _tiny_bert(tmp_path / "init")
    cb = InflensCallback(tmp_path / "run", checkpoint_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    state, control = TrainerState(), TrainerControl()
    for step in range(1, 6):
        state.global_step = step
        opt.step()
        sched.step()
        cb.on_step_end(None, state, control, model=model, optimizer=opt, lr_scheduler=sched)
    entries = read_checkpoints(tmp_path / "run")
    assert [e["step"] for e in entries] == [2, 4]
    assert [e["learning_rate"] for e in entries] == pytest.approx([0.1 / 3, 0.1 / 5])
    cb.on_train_end(None, state, control, model=model, processing_class=tok)
    assert (tmp_path / "run" / "config.json").is_file()
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "tokenizer_config.json").is_file()
    scores = _explain_folder(tmp_path / "run", tmp_path, capsys)
    assert scores.shape == (1, len(REVIEWS)) and torch.isfinite(scores).all()


def test_real_trainer_run(tmp_path: Path, capsys) -> None:
    """A few steps of transformers.Trainer with the callback, then inflens explain on its folder."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    import transformers

    from inflens.callbacks import InflensCallback

    model, tok = _tiny_bert(tmp_path / "init")
    enc = tok([t for t, _ in REVIEWS], padding="max_length", max_length=6)

    class Reviews(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(REVIEWS)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": torch.tensor(enc["input_ids"][i]),
                    "attention_mask": torch.tensor(enc["attention_mask"][i]),
                    "labels": torch.tensor(REVIEWS[i][1])}  # fmt: skip

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=4,
        learning_rate=1e-2, logging_strategy="no", save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    cb = InflensCallback(tmp_path / "run", checkpoint_every=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Reviews(),
                                   processing_class=tok, callbacks=[cb])  # fmt: skip
    trainer.train()
    entries = read_checkpoints(tmp_path / "run")
    assert [e["step"] for e in entries] == [2, 4]
    assert all(0 <= e["learning_rate"] <= 1e-2 for e in entries)
    # the final weights on disk are the trained ones
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    torch.testing.assert_close(saved["classifier.weight"], model.classifier.weight.detach().cpu())
    scores = _explain_folder(tmp_path / "run", tmp_path, capsys)
    assert scores.shape == (1, len(REVIEWS)) and torch.isfinite(scores).all()


def test_callback_needs_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    import inflens.callbacks as cbmod

    monkeypatch.delitem(cbmod.__dict__, "InflensCallback", raising=False)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        cbmod.InflensCallback  # noqa: B018

"""The command line: experiment discovery, unknown names, --threads."""

from __future__ import annotations

import pytest
import torch

from inflens import cli


def test_list_names_every_experiment(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["reproduce", "list"]) == 0
    names = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    for name in ("fig1", "fig2-linear", "fig2-cnn", "fig3", "fig4", "fig5", "fig6", "hospital"):
        assert name in names


def test_unknown_experiment_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["reproduce", "fig99", "--out", "/nonexistent/never"]) == 2
    assert "unknown experiment 'fig99'" in capsys.readouterr().err


def test_threads_option_sets_torch_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert cli.main(["reproduce", "list", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        with pytest.raises(SystemExit):
            cli.main(["reproduce", "list", "--threads", "0"])
    finally:
        torch.set_num_threads(before)

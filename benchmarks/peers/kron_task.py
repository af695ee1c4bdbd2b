"""The kronfluence task of the peer benchmarks: summed cross-entropy of ``(x, y)`` batches.

Shared by ``run.py`` and ``lds_peers.py`` (run from the peers' virtualenv, where kronfluence is
installed). With ``sample=True`` the training loss uses labels drawn from the model's predictive
distribution, so kronfluence's factors estimate the true Fisher (the Gauss-Newton matrix of the
cross-entropy), as inflens's K-FAC does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_task():
    """A ``kronfluence.task.Task`` for a classifier ``model(x) -> logits`` on ``(x, y)``."""
    from kronfluence.task import Task

    class CrossEntropyTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            xb, yb = batch
            logits = model(xb)
            if sample:  # the true Fisher: labels drawn from the model
                with torch.no_grad():
                    yb = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
            return F.cross_entropy(logits, yb, reduction="sum")

        def compute_measurement(self, batch, model):
            xb, yb = batch
            return F.cross_entropy(model(xb), yb, reduction="sum")

    return CrossEntropyTask()

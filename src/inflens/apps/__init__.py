"""Applications of influence functions, one use case per module (Sec. 5 of the paper)."""

from . import attack, compare, labels, mislabel, mismatch
from .mislabel import (
    LabelFixingConfig,
    LabelFixingResult,
    logistic_leverage,
    logistic_self_influence,
    rank_for_review,
    self_influence_scores,
    simulate_label_fixing,
)
from .mismatch import ErrorReport, compare_coefficients, explain_errors, wrongly_predicted

__all__ = [
    "ErrorReport",
    "LabelFixingConfig",
    "LabelFixingResult",
    "attack",
    "compare",
    "compare_coefficients",
    "explain_errors",
    "labels",
    "logistic_leverage",
    "logistic_self_influence",
    "mislabel",
    "mismatch",
    "rank_for_review",
    "self_influence_scores",
    "simulate_label_fixing",
    "wrongly_predicted",
]

"""The trainable classification head that replaces the backbone's classifier."""

from __future__ import annotations

from torch import nn

from src.utils.errors import ConfigError


def build_head(in_features: int, num_classes: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    """Linear(in, hidden) → ReLU → Dropout → Linear(hidden, classes) → LogSoftmax(dim=1).

    Outputs log-probabilities, for NLLLoss.
    """
    check_head(hidden_dim, dropout)
    if num_classes < 2:
        raise ConfigError(f"A classifier needs at least 2 classes, the dataset has {num_classes}.")
    return nn.Sequential(
        nn.Linear(in_features, hidden_dim),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, num_classes),
        nn.LogSoftmax(dim=1),
    )


def check_head(hidden_dim: int, dropout: float) -> None:
    """Raise ConfigError unless dropout is in [0, 1) and hidden_dim is a positive integer."""
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"model.head.dropout must be a number in [0, 1), got {dropout!r}.")
    if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
        raise ConfigError(f"model.head.hidden_dim must be a positive integer, got {hidden_dim!r}.")

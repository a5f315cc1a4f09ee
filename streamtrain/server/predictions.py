"""Predictions (kato-api.md §5.6) — placeholder until the full port lands."""

from __future__ import annotations

from typing import Any


def predict(engine, kb: str, stm: list[list[str]], *, recall_threshold: float, max_predictions: int,
            use_token_matching: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    return [], []

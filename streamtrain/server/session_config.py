"""Session configuration as KATO 3.10.1 validates and reports it (kato-api.md §4)."""

from __future__ import annotations

from typing import Any

# The effective config KATO returns, in its order (configuration_service.py defaults).
DEFAULTS: dict[str, Any] = {
    "max_pattern_length": 0,
    "persistence": 5,
    "recall_threshold": 0.1,
    "indexer_type": "VI",
    "max_predictions": 100,
    "sort_symbols": True,
    "process_predictions": True,
    "use_token_matching": True,
    "stm_mode": "CLEAR",
    "rank_sort_algo": "potential",
    "filter_pipeline": [],
    "length_min_ratio": 0.5,
    "length_max_ratio": 2.0,
    "jaccard_threshold": 0.3,
    "jaccard_min_overlap": 2,
    "minhash_threshold": 0.7,
    "minhash_bands": 20,
    "minhash_rows": 5,
    "minhash_num_hashes": 100,
    "bloom_false_positive_rate": 0.01,
    "max_candidates_per_stage": 100000,
    "enable_filter_metrics": True,
}
# Settable keys that only show once set (SessionConfiguration fields without a default in the output).
OPTIONAL_KEYS = ("fuzzy_token_threshold", "affinity_emotive")
SETTABLE = tuple(k for k in DEFAULTS if k not in ("length_min_ratio", "length_max_ratio")) + OPTIONAL_KEYS

INDEXERS = ["VI", "LSH", "ANNOY", "FAISS"]
RANK_ALGOS = [
    "potential", "similarity", "evidence", "confidence", "snr", "fragmentation", "frequency",
    "normalized_entropy", "global_normalized_entropy", "itfdf_similarity", "confluence",
    "predictive_information", "bayesian_posterior", "bayesian_prior", "bayesian_likelihood", "tfidf_score",
    "weighted_similarity", "weighted_evidence", "weighted_confidence", "weighted_snr",
]
FILTERS = ["minhash", "jaccard", "bloom", "rapidfuzz"]
STM_MODES = ("CLEAR", "ROLLING")


def effective(overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(DEFAULTS)
    for k, v in overrides.items():
        if v is not None:
            out[k] = v
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int)  # KATO uses isinstance(v, int): True/False pass as 1/0


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_update(updates: dict[str, Any]) -> dict[str, str]:
    """POST /sessions/{id}/config rules (configuration_service.validate_configuration_update), messages verbatim."""
    errors: dict[str, str] = {}
    if "recall_threshold" in updates:
        v = updates["recall_threshold"]
        if not _is_num(v) or not 0.0 <= v <= 1.0:
            errors["recall_threshold"] = "Must be a number between 0.0 and 1.0"
    if "persistence" in updates:
        v = updates["persistence"]
        if not _is_int(v) or not 1 <= v <= 100:
            errors["persistence"] = "Must be an integer between 1 and 100"
    if "max_pattern_length" in updates:
        v = updates["max_pattern_length"]
        if not _is_int(v) or v < 0:
            errors["max_pattern_length"] = "Must be a non-negative integer"
    if "max_predictions" in updates:
        v = updates["max_predictions"]
        if not _is_int(v) or not 1 <= v <= 10000:
            errors["max_predictions"] = "Must be an integer between 1 and 10000"
    if "indexer_type" in updates:
        v = updates["indexer_type"]
        if not isinstance(v, str) or v not in INDEXERS:
            errors["indexer_type"] = f"Must be one of: {', '.join(INDEXERS)}"
    for key in ("sort", "process_predictions", "use_token_matching"):
        if key in updates and not isinstance(updates[key], bool):
            errors[key] = "Must be a boolean (true/false)"
    if "rank_sort_algo" in updates:
        v = updates["rank_sort_algo"]
        if not isinstance(v, str) or v not in RANK_ALGOS:
            errors["rank_sort_algo"] = f"Must be one of: {', '.join(RANK_ALGOS)}"
    return errors


def apply_update(overrides: dict[str, Any], config_data: dict[str, Any]) -> dict[str, Any]:
    """The overrides after a valid POST config (sessions.py:264-301): unknown keys ignored, invalid
    stm_mode becomes CLEAR, use_token_matching without sort_symbols also sets sort_symbols."""
    out = dict(overrides)
    for k, v in config_data.items():
        if k in SETTABLE:
            out[k] = v
    if "stm_mode" in config_data and config_data["stm_mode"] not in STM_MODES:
        out["stm_mode"] = "CLEAR"
    if "use_token_matching" in config_data and "sort_symbols" not in config_data:
        out["sort_symbols"] = config_data["use_token_matching"]
    return out


def validate_create(config: dict[str, Any]) -> dict[str, str]:
    """Session-creation rules (SessionConfiguration.validate: range checks, no type checks for booleans).

    KATO drops the whole config silently when one value fails; this server answers 400 with these errors
    instead (a listed deviation)."""
    errors: dict[str, str] = {}

    def check(key: str, ok, msg: str) -> None:
        v = config.get(key)
        if v is None:
            return
        try:
            good = ok(v)
        except TypeError:
            good = False
        if not good:
            errors[key] = msg

    check("recall_threshold", lambda v: 0.0 <= v <= 1.0, "Must be a number between 0.0 and 1.0")
    check("persistence", lambda v: 1 <= v <= 100, "Must be an integer between 1 and 100")
    check("max_pattern_length", lambda v: v >= 0, "Must be a non-negative integer")
    check("max_predictions", lambda v: 1 <= v <= 10000, "Must be an integer between 1 and 10000")
    check("fuzzy_token_threshold", lambda v: 0.0 <= v <= 1.0, "Must be a number between 0.0 and 1.0")
    check("indexer_type", lambda v: v in INDEXERS, f"Must be one of: {', '.join(INDEXERS)}")
    check("rank_sort_algo", lambda v: v in RANK_ALGOS, f"Must be one of: {', '.join(RANK_ALGOS)}")
    check("filter_pipeline", lambda v: all(f in FILTERS for f in v), f"Must be a list of: {', '.join(FILTERS)}")
    check("jaccard_threshold", lambda v: 0.0 <= v <= 1.0, "Must be a number between 0.0 and 1.0")
    check("jaccard_min_overlap", lambda v: v >= 1, "Must be an integer >= 1")
    check("minhash_threshold", lambda v: 0.0 <= v <= 1.0, "Must be a number between 0.0 and 1.0")
    check("minhash_bands", lambda v: 1 <= v <= 100, "Must be an integer between 1 and 100")
    check("minhash_rows", lambda v: 1 <= v <= 20, "Must be an integer between 1 and 20")
    check("minhash_num_hashes", lambda v: 10 <= v <= 256, "Must be an integer between 10 and 256")
    check("bloom_false_positive_rate", lambda v: 0.0001 <= v <= 0.1, "Must be a number between 0.0001 and 0.1")
    check("max_candidates_per_stage", lambda v: v >= 100, "Must be an integer >= 100")
    # Beyond KATO: values this server computes with must have a usable type.
    for key in ("max_pattern_length", "max_predictions"):
        if key not in errors and config.get(key) is not None and not _is_int(config[key]):
            errors[key] = "Must be an integer"
    if "recall_threshold" not in errors and config.get("recall_threshold") is not None \
            and not _is_num(config["recall_threshold"]):
        errors["recall_threshold"] = "Must be a number between 0.0 and 1.0"
    return errors


def create_overrides(config: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in config.items() if k in SETTABLE and v is not None}
    if out.get("stm_mode") is not None and out["stm_mode"] not in STM_MODES:
        out["stm_mode"] = "CLEAR"
    return out

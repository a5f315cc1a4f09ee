"""Tokenizers: the offline words tokenizer, and gpt2's clear error when its files are not on the machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiktoken

from streamtrain.errors import TokenizerUnavailable
from streamtrain.tokenize import encoding_tokenizer, get_tokenizer


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Don't stop, Horatio!", ["Don't", "stop", ",", "Horatio", "!"]),
        ("O, 'tis true: 'twas brillig.", ["O", ",", "'", "tis", "true", ":", "'", "twas", "brillig", "."]),
        ("rock\u2019n\u2019roll 42x", ["rock\u2019n\u2019roll", "42x"]),
        ("  spaces\tand\nlines  ", ["spaces", "and", "lines"]),
        ("Schöne Grüße--naïve", ["Schöne", "Grüße", "-", "-", "naïve"]),
        ("", []),
    ],
)
def test_words(text: str, tokens: list[str]) -> None:
    assert get_tokenizer("words")(text) == tokens


def test_gpt2_without_files_says_how_to_provide_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No BPE files in the cache: a clear error naming TIKTOKEN_CACHE_DIR, never a network attempt."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(TokenizerUnavailable, match=rf"(?s){tmp_path}.*TIKTOKEN_CACHE_DIR.*tokenizer = \"words\""):
        get_tokenizer("gpt2")


def test_unknown_tokenizer() -> None:
    with pytest.raises(TokenizerUnavailable, match="unknown tokenizer"):
        get_tokenizer("bert")  # type: ignore[arg-type]


def test_bpe_tokens_are_decoded_text() -> None:
    """BPE token ids become their text; a byte-level tokenizer (no merges) gives one token per byte."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"th"] = 256
    enc = tiktoken.Encoding(name="tiny", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={})
    tokenize = encoding_tokenizer(enc)
    assert tokenize("the cat") == ["th", "e", " ", "c", "a", "t"]
    assert "".join(tokenize("naïve")) == "na\ufffd\ufffdve"  # the two bytes of 'ï' are split

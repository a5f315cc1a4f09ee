"""Tokenizers: text -> list of string symbols (KATO learns strings, so tokens are kept as text).

* ``words``: words and punctuation marks, offline, no files. Apostrophes inside a word stay in it ("don't").
* ``gpt2``: tiktoken's GPT-2 BPE; each token is its decoded text. Needs the BPE files in tiktoken's cache
  (``TIKTOKEN_CACHE_DIR``); this module never downloads them.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from .errors import TokenizerUnavailable

Tokenizer = Callable[[str], list[str]]

# A word is letters/digits (any script) with inner apostrophes (straight or curly); anything else that is not
# space is one punctuation token.
_WORDS = re.compile(r"\w+(?:['\u2019]\w+)*|[^\w\s]")

_GPT2_FILES = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)


def words(text: str) -> list[str]:
    """Split text into words and punctuation marks: ``"Don't stop!"`` -> ``["Don't", "stop", "!"]``."""
    return _WORDS.findall(text)


def tiktoken_cache_dir() -> Path:
    """Where tiktoken looks for its files (the same rule tiktoken applies)."""
    env = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / "data-gym-cache"


def _gpt2() -> Tokenizer:
    try:
        import tiktoken
    except ImportError:
        raise TokenizerUnavailable(
            "tokenizer 'gpt2' needs the tiktoken package: pip install 'streamtrain[gpt2]' (or use tokenizer = \"words\")"
        ) from None
    cache = tiktoken_cache_dir()
    missing = [url for url in _GPT2_FILES if not (cache / hashlib.sha1(url.encode()).hexdigest()).is_file()]
    if missing:
        # Checked up front: tiktoken would otherwise try the network, which may hang rather than fail offline.
        raise TokenizerUnavailable(
            f"tokenizer 'gpt2' needs tiktoken's GPT-2 BPE files, and {cache} lacks {len(missing)} of them. "
            "On a machine with internet access run: python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\" "
            "with TIKTOKEN_CACHE_DIR set to a folder, copy that folder here and set TIKTOKEN_CACHE_DIR to it; "
            "or use tokenizer = \"words\"."
        )
    try:
        encoding = tiktoken.get_encoding("gpt2")
    except Exception as exc:  # a damaged cached file
        raise TokenizerUnavailable(f"tokenizer 'gpt2' could not be loaded from {cache}: {exc}") from exc
    return encoding_tokenizer(encoding)


def encoding_tokenizer(encoding: Any) -> Tokenizer:
    """Wrap a tiktoken Encoding: tokens are the decoded text of each BPE token (bytes split inside a UTF-8
    character decode with replacement characters)."""

    def tokenize(text: str) -> list[str]:
        return [encoding.decode_single_token_bytes(t).decode("utf-8", "replace") for t in encoding.encode_ordinary(text)]

    return tokenize


def get_tokenizer(name: Literal["words", "gpt2"]) -> Tokenizer:
    """The tokenizer called ``name`` in a run config; TokenizerUnavailable when its files are missing."""
    if name == "words":
        return words
    if name == "gpt2":
        return _gpt2()
    raise TokenizerUnavailable(f"unknown tokenizer {name!r}: use 'words' or 'gpt2'")

"""Tokenizers: text -> list of string symbols (KATO learns strings, so tokens are kept as text).

* ``words``: words and punctuation marks, offline, no files. Apostrophes inside a word stay in it ("don't").
* ``gpt2``: tiktoken's GPT-2 BPE; each token is its decoded text. Needs the BPE files in tiktoken's cache
  (``TIKTOKEN_CACHE_DIR``); this module never downloads them.
* ``{hf = "..."}``: a Hugging Face ``tokenizers`` tokenizer, from a ``tokenizer.json`` file (a value ending in
  ``.json``) or a hub model name (its ``tokenizer.json``, fetched by ``huggingface_hub`` online or read from
  the hub cache offline). Each token is the tokenizer's own token string (``"Ġthe"`` in a byte-level BPE,
  ``"##ing"`` in WordPiece): one symbol per vocabulary entry, which :func:`hf_decode` turns back into text.
  No special tokens are added (no ``[CLS]``/``[SEP]`` in every sample).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from ..errors import TokenizerUnavailable

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


def is_hf_file(spec: str) -> bool:
    """Whether an ``hf`` value names a local tokenizer.json file (it ends in .json) rather than a hub model."""
    return spec.lower().endswith(".json")


_HF_CACHE: dict[tuple[str, int, int], Any] = {}


def load_hf(spec: str) -> Any:
    """The ``tokenizers.Tokenizer`` an ``hf`` value names (a tokenizer.json path, or a hub model name);
    TokenizerUnavailable, saying what to do, when it cannot be had."""
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise TokenizerUnavailable(
            f"tokenizer {{hf = {spec!r}}} needs the tokenizers package: pip install tokenizers"
        ) from None
    path = Path(spec) if is_hf_file(spec) else _hub_file(spec)
    try:
        stat = path.stat()
    except OSError as exc:
        raise TokenizerUnavailable(
            f"tokenizer {{hf = {spec!r}}}: cannot read {path}: {exc.strerror or exc}. Give the path of an existing "
            "tokenizer.json (in a run config file, relative to the file's folder), or a Hugging Face Hub model name."
        ) from None
    key = (str(path.absolute()), stat.st_mtime_ns, stat.st_size)
    if key not in _HF_CACHE:
        try:
            _HF_CACHE[key] = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a file it cannot parse
            raise TokenizerUnavailable(
                f"tokenizer {{hf = {spec!r}}}: {path} is not a tokenizer.json the tokenizers library can read: "
                f"{exc}. Save the tokenizer with tokenizer.save(path) (tokenizers) or "
                "tokenizer.save_pretrained(folder) (transformers), and point hf at that tokenizer.json."
            ) from exc
    return _HF_CACHE[key]


def _hub_file(name: str) -> Path:
    """The tokenizer.json of a hub model: downloaded when the hub is reachable, else read from the hub cache."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - datasets depends on huggingface_hub
        raise TokenizerUnavailable(
            f"tokenizer {{hf = {name!r}}} names a hub model, which needs the huggingface_hub package: "
            "pip install huggingface_hub (or give the path of a tokenizer.json)"
        ) from None
    try:
        return Path(hf_hub_download(name, "tokenizer.json"))
    except Exception as exc:  # offline, unknown repo, no tokenizer.json in it, invalid name: all say the same
        local = " (a local folder has that name: give the path of its tokenizer.json instead)" if Path(name).is_dir() else ""
        raise TokenizerUnavailable(
            f"tokenizer {{hf = {name!r}}}: cannot get the tokenizer.json of the Hugging Face Hub model {name!r}"
            f"{local}: {type(exc).__name__}: {exc}\nWhat to do: check the model name; offline (HF_HUB_OFFLINE=1) "
            "the file must be in the hub cache, so fetch it once where the hub is reachable "
            f"(hf download {name} tokenizer.json), or copy a tokenizer.json here and set "
            'tokenizer = { hf = "<its path>" } (a value ending in .json is a file).'
        ) from None


def hf_tokenizer(tokenizer: Any) -> Tokenizer:
    """Wrap a ``tokenizers.Tokenizer``: the token strings of the encoding, without special tokens."""

    def tokenize(text: str) -> list[str]:
        return list(tokenizer.encode(text, add_special_tokens=False).tokens)

    return tokenize


def hf_decode(tokenizer: Any, tokens: list[str]) -> str:
    """Text from token strings of ``tokenizer`` (its decoder restores spaces and bytes); tokens not in its
    vocabulary are kept as they are."""
    ids = [tokenizer.token_to_id(t) for t in tokens]
    if all(i is not None for i in ids):
        return str(tokenizer.decode(ids, skip_special_tokens=False))
    return "".join(tokens)


def get_tokenizer(name: Literal["words", "gpt2"] | Any) -> Tokenizer:
    """The tokenizer a run config names (``"words"``, ``"gpt2"`` or an ``HFTokenizer``/``{"hf": ...}``);
    TokenizerUnavailable when its files are missing."""
    if name == "words":
        return words
    if name == "gpt2":
        return _gpt2()
    spec = name.get("hf") if isinstance(name, dict) else getattr(name, "hf", None)
    if isinstance(spec, str) and spec:
        return hf_tokenizer(load_hf(spec))
    raise TokenizerUnavailable(
        f"unknown tokenizer {name!r}: use 'words', 'gpt2' or {{hf = '<path of a tokenizer.json, or a hub name>'}}"
    )

"""Tokenizers: the offline words tokenizer, and gpt2's clear error when its files are not on the machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiktoken

from streamtrain.data.tokenization import encoding_tokenizer, get_tokenizer
from streamtrain.errors import TokenizerUnavailable


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


# -- Hugging Face tokenizers ({hf = "..."}) ------------------------------------------------------------------

from tiny_tokenizer import build_tokenizer_json, install_in_hub_cache  # noqa: E402  (tests/ is on sys.path)

from streamtrain.analysis import tokens_to_text  # noqa: E402
from streamtrain.config import HFTokenizer  # noqa: E402


def test_hf_tokenizer_from_a_file(tmp_path: Path) -> None:
    """The tokens are the tokenizer's own token strings, no special tokens added, and they decode back to the text."""
    path = build_tokenizer_json(tmp_path / "tok" / "tokenizer.json", special_template=True)
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(path))
    text = "To be, or not to be: naïve arrows!"
    for spec in (HFTokenizer(hf=str(path)), {"hf": str(path)}):
        tokens = get_tokenizer(spec)(text)
        assert tokens == reference.encode(text, add_special_tokens=False).tokens
        assert "[CLS]" not in tokens and "[SEP]" not in tokens  # the template is not applied
        assert "Ġbe" in tokens  # byte-level BPE tokens, merged by training
        assert tokens_to_text(tokens, spec) == text
    assert get_tokenizer(HFTokenizer(hf=str(path)))("") == []


def test_hf_tokenizer_missing_or_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(TokenizerUnavailable, match=rf"(?s)cannot read {missing}.*existing tokenizer.json"):
        get_tokenizer(HFTokenizer(hf=str(missing)))
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerUnavailable, match=rf"(?s){bad} is not a tokenizer.json.*save"):
        get_tokenizer(HFTokenizer(hf=str(bad)))


def test_hf_hub_name_offline_without_the_file_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 (tests/conftest.py) and a name not in the hub cache: a clear error, no network attempt."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someorg" / "tiny").mkdir(parents=True)  # a local folder with the same name as the model
    with pytest.raises(TokenizerUnavailable) as info:
        get_tokenizer(HFTokenizer(hf="someorg/tiny"))
    msg = str(info.value)
    assert "Hugging Face Hub model 'someorg/tiny'" in msg and "HF_HUB_OFFLINE" in msg
    assert "a local folder has that name: give the path of its tokenizer.json" in msg
    assert "hf download someorg/tiny tokenizer.json" in msg


def test_hf_hub_name_from_the_hub_cache(tmp_path: Path) -> None:
    """A hub model name offline: its tokenizer.json comes from the hub cache (a real cache layout, in a child
    process, since huggingface_hub reads HF_HUB_CACHE when imported)."""
    import os
    import subprocess
    import sys

    path = build_tokenizer_json(tmp_path / "tokenizer.json")
    install_in_hub_cache(tmp_path / "hub", "someorg/tiny-tok", path)
    code = "from streamtrain.data.tokenization import get_tokenizer; print(get_tokenizer({'hf': 'someorg/tiny-tok'})('to be or not'))"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    from tokenizers import Tokenizer

    assert proc.stdout.strip() == str(Tokenizer.from_file(str(path)).encode("to be or not").tokens)

"""A tiny Hugging Face tokenizer.json trained by the tests themselves (the tokenizers library, in milliseconds)."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "or to take arms against a sea of troubles, and by opposing end them.",
] * 10


def build_tokenizer_json(path: Path, vocab_size: int = 300, special_template: bool = False) -> Path:
    """A byte-level BPE (GPT-2's design) trained on CORPUS, saved as ``path``. With ``special_template``, its
    post-processor wraps every encoding in [CLS] ... [SEP], as BERT's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["[CLS]", "[SEP]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    if special_template:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))]
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def install_in_hub_cache(cache: Path, repo_id: str, tokenizer_json: Path) -> None:
    """Lay ``tokenizer_json`` out in a Hugging Face Hub cache folder (HF_HUB_CACHE) as model ``repo_id``'s main
    revision, the way huggingface_hub stores a download, so offline mode finds it there."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())

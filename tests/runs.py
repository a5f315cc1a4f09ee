"""What the trainer tests share: the small run they train, and knowledge bases compared level by level."""

from __future__ import annotations

import sys
from pathlib import Path

from streamtrain import analysis
from streamtrain.client import KatoClient
from streamtrain.config import ClientConfig, DatasetConfig, LayerConfig, RunConfig

SAMPLES = 90
LAYERS = [LayerConfig(chunk_size=6), LayerConfig(chunk_size=4), LayerConfig(chunk_size=3)]


def make_config(tmp_path: Path, corpus: Path, run_name: str, url: str | None, **overrides) -> RunConfig:
    fields = dict(
        run_name=run_name,
        server_url=url,
        dataset=DatasetConfig(path="parquet", data_files=str(corpus / "*.parquet"), min_chars=20),
        layers=LAYERS,
        max_samples=SAMPLES,
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_every=7,
        checkpoint_every_seconds=None,
        client=ClientConfig(outage_seconds=30, read_timeout=10),
    )
    fields.update(overrides)
    return RunConfig(**fields)


def train_command(config: Path, *options: str) -> list[str]:
    """`python -m streamtrain train --config CONFIG --no-progress OPTIONS...`: the command a user runs, for the tests
    that kill or signal a trainer in its own process (run through conftest's zygote, or subprocess). Its exit code is
    the CLI's own (streamtrain.cli.main): 0, 1 for an error, 3 with samples still failed, 130 interrupted."""
    return [sys.executable, "-m", "streamtrain", "train", "--config", str(config), "--no-progress", *options]


def kb_by_level(url: str, cfg: RunConfig, token: str | None = None) -> dict[int, dict[str, int]]:
    """{level: {pattern name: frequency}}: names above level 0 are names of names, independent of the run's name,
    so runs under different run_names on one server compare exactly."""
    with KatoClient(url, token=token) as client:
        return analysis.kb_by_level(client, cfg)

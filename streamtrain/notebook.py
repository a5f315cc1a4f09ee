"""Presentation helpers for the notebooks: DataFrames, plots, and readable errors. Needs the ``notebook`` extra.

The data comes from :mod:`streamtrain.analysis` and from :class:`~streamtrain.trainer.TrainResult`; this module
only shapes and draws it, so every number a notebook shows is one the library computed.

    from streamtrain import notebook as nb
    nb.setup()   # a StreamtrainError now shows one readable message, not a 40-line traceback
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .analysis import Connection, connect
from .config import RunConfig, load_config, parse_config
from .errors import StreamtrainError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .trainer import TrainResult

log = logging.getLogger(__name__)

__all__ = [
    "Connection",
    "Interrupter",
    "connect",
    "demo_config",
    "ensure_corpus",
    "kb_path",
    "ensure_run",
    "error_message",
    "frame",
    "has_run",
    "history_frame",
    "latest_config",
    "plot_frequency_distribution",
    "plot_patterns_per_level",
    "plot_throughput",
    "results_frame",
    "setup",
    "start_over",
    "with_changes",
]


# --------------------------------------------------------------------------------------------------
# Errors: one readable message per StreamtrainError


def error_message(exc: BaseException) -> str:
    """What a notebook shows for a StreamtrainError: its class and message (which already say what, where, what
    to do), without the traceback through library internals."""
    return f"{type(exc).__name__}: {exc}"


def _show_streamtrain_error(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: int | None = None) -> list[str]:
    # A structured traceback is a list of (ANSI-coloured) strings; this one has no frames on purpose.
    head, _, rest = error_message(value).partition(": ")
    stb = [f"\x1b[0;31m{head}\x1b[0m: {rest}",
           "(a streamtrain error: the message says what to do; streamtrain.notebook.setup() hid the traceback)"]
    # IPython's run_code ignores the handler's return value: show it the way showtraceback would, which sends
    # the kernel's 'error' message (so the cell still fails, and a notebook run stops here).
    shell._showtraceback(etype, value, stb)
    return stb


def setup(*, offline: bool = True, log_level: int = logging.WARNING) -> None:
    """Prepare a notebook kernel: readable StreamtrainErrors, quiet logs, and offline datasets.

    Args:
        offline: set ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` (unless already set), so a local corpus never
            waits on the Hugging Face hub.
        log_level: level of the root logger's console handler (warnings by default; INFO shows retries).

    Outside IPython (a plain script) only the environment and logging are set.
    """
    if offline:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    pd.set_option("display.max_colwidth", 100)  # decoded patterns are text: show more than 50 characters
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - the notebook extra brings IPython
        return
    shell = get_ipython()
    if shell is not None:
        shell.set_custom_exc((StreamtrainError,), _show_streamtrain_error)


# --------------------------------------------------------------------------------------------------
# Runs: the demo config, starting over, making sure a run exists


def demo_config(*, run_name: str = "demo", checkpoint_dir: str | Path = "checkpoints",
                data_dir: str | Path = "data/demo", **overrides: Any) -> RunConfig:
    """The bundled demo config (``streamtrain/demo/demo.toml``) reading ``data_dir``'s Parquet shards, with
    ``run_name``, ``checkpoint_dir`` and any other top-level field overridden (validated: a bad value raises
    ConfigError listing it). Both folders are made absolute, so notebooks in any working folder agree."""
    from .demo import DEMO_CONFIG

    base = load_config(DEMO_CONFIG).model_dump(mode="json")
    base["dataset"] = {**base["dataset"], "path": "parquet",
                       "data_files": str(Path(data_dir).resolve() / "*.parquet")}
    base.update(run_name=run_name, checkpoint_dir=str(Path(checkpoint_dir).resolve()))
    base.update({k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v) for k, v in overrides.items()})
    return parse_config(base, "demo config")


def ensure_corpus(data_dir: str | Path, shards: int = 4) -> Path:
    """Build the demo corpus into ``data_dir`` unless its Parquet shards are already there."""
    data_dir = Path(data_dir)
    if not any(data_dir.glob("*.parquet")):
        from .demo import build_demo_corpus

        build_demo_corpus(data_dir, shards=shards)
    return data_dir


def start_over(config: RunConfig) -> Path | None:
    """Move the run's folder (checkpoints, journal, embedded knowledge base) aside, as ``train(fresh=True,
    move_aside=True)`` would; return where it went, or None when there was nothing to move."""
    from .rundir import RunDir

    return RunDir(config.run_dir).move_aside()


def kb_path(config: RunConfig) -> Path:
    """Where the embedded server keeps the run's knowledge base (``streamtrain.rundir`` owns the layout)."""
    from .rundir import RunDir

    return RunDir(config.run_dir).kb_path


def with_changes(config: RunConfig, **changes: Any) -> RunConfig:
    """A copy of ``config`` with top-level fields changed, validated like a config file (ConfigError on a bad
    value); ``model_copy(update=...)`` would skip the validation."""
    data = config.model_dump(mode="json")
    if config.server_token is not None:  # a secret, left out of every dump: carried over explicitly
        data["server_token"] = config.server_token
    data.update({k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v) for k, v in changes.items()})
    return parse_config(data, f"changes {sorted(changes)}")


def has_run(config: RunConfig) -> bool:
    """Whether the run's folder holds at least one checkpoint file."""
    from .records.checkpoint import CheckpointStore

    return bool(CheckpointStore(config.run_dir).paths())


def ensure_run(config: RunConfig, stops: Sequence[int] = (40, 80), workers: Sequence[int] = (1, 2), *,
               progress: bool = False) -> list[TrainResult]:
    """Train ``config``'s run when its folder has no checkpoint yet, so a notebook also works on its own: one
    ``train`` call per stop (``max_samples``), with that call's number of workers. Returns the results (empty
    when the run already existed)."""
    from .trainer import train

    if has_run(config):
        return []
    results = []
    for stop, n in zip(stops, workers, strict=False):  # workers may list more counts than stops
        results.append(train(with_changes(config, max_samples=stop, num_workers=n), progress=progress))
    return results


def latest_config(config: RunConfig) -> RunConfig:
    """The config the run was last trained with (from its newest valid checkpoint), or ``config`` itself."""
    from .records.checkpoint import CheckpointStore

    found = CheckpointStore(config.run_dir).latest()
    return found.config if found is not None else config


class Interrupter:
    """Presses Ctrl-C on this process once the run writes a checkpoint past ``after_position``.

    The same as the kernel's stop button, at a reproducible moment: ``train`` then finishes the samples in
    flight, writes an ``interrupt`` checkpoint and returns (reason ``"interrupt"``). Fires at most once.
    """

    def __init__(self, config: RunConfig, after_position: int, timeout: float = 120.0) -> None:
        import threading

        self.config, self.after_position, self.timeout = config, after_position, timeout
        self.fired_at: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="streamtrain-interrupter", daemon=True)

    def _watch(self) -> None:
        import signal
        import time

        from .records.checkpoint import CheckpointStore

        store = CheckpointStore(self.config.run_dir)
        seen = {seq for seq, _ in store.paths()}
        deadline = time.monotonic() + self.timeout
        while not self._stop.is_set() and time.monotonic() < deadline:
            for seq, path in store.paths():
                if seq in seen:
                    continue
                seen.add(seq)
                try:
                    ckpt = store.load(path)
                except StreamtrainError:
                    continue
                # Only an interval checkpoint proves the run is still going; an 'end' one may come after return
                if ckpt.reason == "interval" and ckpt.position.raw_offset > self.after_position:
                    self.fired_at = ckpt.position.raw_offset
                    os.kill(os.getpid(), signal.SIGINT)
                    return
            self._stop.wait(0.05)

    def __enter__(self) -> Interrupter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------
# Tables


def frame(rows: Sequence[Mapping[str, Any]], index: str | None = None) -> pd.DataFrame:
    """A DataFrame of analysis rows (list of dicts), optionally indexed by one column."""
    df = pd.DataFrame(list(rows)).convert_dtypes()  # a missing value keeps an int column int (nullable)
    return df.set_index(index) if index and not df.empty else df


def _named(results: Mapping[str, TrainResult] | Sequence[TrainResult]) -> list[tuple[str, TrainResult]]:
    if isinstance(results, Mapping):
        return list(results.items())
    return [(f"{r.run_name} #{i}", r) for i, r in enumerate(results, 1)]


RESULT_COLUMNS = [
    "run_name", "reason", "resumed", "num_workers", "start_position", "final_position", "new_samples",
    "samples_trained", "samples_filtered", "samples_failed", "tokens", "patterns_learned", "elapsed_seconds",
    "samples_per_second", "tokens_per_second", "checkpoints_written",
]


def results_frame(results: Mapping[str, TrainResult] | Sequence[TrainResult]) -> pd.DataFrame:
    """One row per train() call (label -> TrainResult, or a list), with the columns a reader compares."""
    rows = []
    for label, r in _named(results):
        data = r.model_dump()
        rows.append({"call": label, **{c: data[c] for c in RESULT_COLUMNS}})
    df = pd.DataFrame(rows).set_index("call")
    return df.round({"elapsed_seconds": 2, "samples_per_second": 1, "tokens_per_second": 0})


def history_frame(results: Mapping[str, TrainResult] | Sequence[TrainResult]) -> pd.DataFrame:
    """Every progress point of every call, with the throughput since the previous point of that call."""
    frames = []
    for label, r in _named(results):
        # the call's starting point, so the first interval has a rate too
        start = {"elapsed_seconds": 0.0, "position": r.start_position,
                 "samples_trained": r.samples_trained - r.new_samples, "tokens": r.tokens - r.new_tokens}
        df = pd.DataFrame([start] + [p.model_dump() for p in r.history])
        df.insert(0, "call", label)
        dt = df["elapsed_seconds"].diff()
        df["samples_per_second"] = (df["samples_trained"].diff() / dt).where(dt > 0)
        df["tokens_per_second"] = (df["tokens"].diff() / dt).where(dt > 0)
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["call", "elapsed_seconds", "position", "samples_trained", "tokens",
                                     "samples_per_second", "tokens_per_second"])
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------------
# Plots (each returns its Axes; pass ``ax`` to draw into a grid)


def _axes(ax: Axes | None, figsize: tuple[float, float] = (7, 3.5)) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_throughput(results: Mapping[str, TrainResult] | Sequence[TrainResult], ax: Axes | None = None,
                    per: str = "samples") -> Axes:
    """Throughput over the run: samples (or tokens) per second against the raw stream position, one line per
    call, so a resumed call continues where the previous one stopped."""
    ax = _axes(ax)
    hist = history_frame(results)
    column = f"{per}_per_second"
    for label, df in hist.groupby("call", sort=False):
        df = df.dropna(subset=[column])
        ax.plot(df["position"], df[column], marker=".", label=label)
    ax.set_xlabel("raw stream position")
    ax.set_ylabel(f"{per} / s")
    ax.set_title(f"Throughput over the run ({per} per second)")
    ax.set_ylim(bottom=0)
    if not hist.empty:
        ax.legend(fontsize="small")
    return ax


def plot_patterns_per_level(summary: Sequence[Mapping[str, Any]], ax: Axes | None = None) -> Axes:
    """Distinct patterns and total learns (frequency) per level, from ``analysis.kb_summary`` rows."""
    ax = _axes(ax)
    df = pd.DataFrame(list(summary))
    width = 0.4
    levels = df["level"].to_numpy()
    ax.bar(levels - width / 2, df["patterns"], width, label="distinct patterns")
    ax.bar(levels + width / 2, df["total_frequency"], width, label="learns (total frequency)")
    ax.set_xticks(levels, [f"L{lv}" for lv in levels])
    ax.set_xlabel("level")
    ax.set_ylabel("count")
    ax.set_title("Patterns per level")
    ax.legend(fontsize="small")
    return ax


def plot_frequency_distribution(distribution: Sequence[Mapping[str, Any]], ax: Axes | None = None) -> Axes:
    """How many patterns were learned f times, against f, on log-log axes; one series per level
    (rows of ``analysis.frequency_distribution``, several levels concatenated)."""
    ax = _axes(ax)
    df = pd.DataFrame(list(distribution))
    for level, part in df.groupby("level") if not df.empty else []:
        ax.plot(part["frequency"], part["patterns"], marker="o", linestyle="-", label=f"L{level}")
    from matplotlib.ticker import ScalarFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("frequency (times learned)")
    ax.set_ylabel("patterns with that frequency")
    ax.set_title("Frequency distribution")
    if not df.empty:
        ax.legend(fontsize="small")
    return ax


# --------------------------------------------------------------------------------------------------
# The whole run, across every call (metrics.jsonl)


def metrics_frame(config: RunConfig) -> pd.DataFrame:
    """Every row of the run's ``metrics.jsonl``: one per interval and per event (start, resume, checkpoint,
    interrupt, error, end), across every call of the run, crashes included."""
    from .records.metrics import read_metrics

    rows = [r.model_dump() for r in read_metrics(config.run_dir)]
    return pd.DataFrame(rows)


def plot_run_history(config: RunConfig, axes: Sequence[Axes] | None = None) -> Sequence[Axes]:
    """Throughput and learns per level over the whole run's training time, each call's start marked (a resume is
    a dashed line), from ``metrics.jsonl``."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(13, 4))
    left, right = axes
    df = metrics_frame(config)
    if df.empty:
        left.set_title("no metrics.jsonl rows yet")
        return axes
    rates = df[df["samples_per_second"] > 0]
    left.plot(rates["elapsed_seconds"], rates["samples_per_second"], marker=".", linestyle="-")
    left.set_xlabel("training time of the run (s)")
    left.set_ylabel("samples / s")
    left.set_title("Throughput over the whole run")
    left.set_ylim(bottom=0)
    levels = len(df["patterns_learned"].iloc[-1])
    for level in range(levels):
        right.plot(df["elapsed_seconds"], [p[level] for p in df["patterns_learned"]], label=f"L{level}")
    right.set_xlabel("training time of the run (s)")
    right.set_ylabel("learns (whole run)")
    right.set_title("Patterns learned per level")
    for _, row in df[df["event"].isin(["start", "resume"])].iterrows():
        for ax in axes:
            ax.axvline(row["elapsed_seconds"], color="grey", linestyle="--" if row["event"] == "resume" else ":",
                       linewidth=0.8)
    right.legend(fontsize="small", title="dashed: a resume")
    return axes

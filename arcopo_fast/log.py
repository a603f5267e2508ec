"""Logging for the command-line entry points: one handler on the `arcopo_fast` logger, a level, and warnings
routed through it, so that `--log-level` / `--quiet` silence or redirect everything the package says.

Every module logs to `logging.getLogger(__name__)` (arcopo_fast.trainer, arcopo_fast.model.tiny_assets, ...).
As a library, arcopo_fast configures nothing (Python's convention): the application decides. The entry
points call `configure(...)` through `add_arguments` / `configure_from_args`:

    python -m arcopo_fast.train --log-level debug      # per-chunk sampler progress, timings
    python -m arcopo_fast.train --quiet                # warnings and errors only (no progress bars)

Progress bars stay tqdm; they are shown only while INFO is enabled (`progress_enabled()`), and log lines
are written through tqdm.write so that they do not break a bar.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tqdm import tqdm

ROOT = "arcopo_fast"
LEVELS = ("debug", "info", "warning", "error")


class _TqdmHandler(logging.StreamHandler):
    """A stderr handler that prints through tqdm.write (an open progress bar is redrawn below the line)."""

    _arcopo = True  # marks the handler configure() owns, so a second configure() replaces it

    def __init__(self, stream=None):
        super().__init__(stream)
        self._fixed = stream  # None: whatever sys.stderr is at each record (it may be replaced later)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream = self._fixed if self._fixed is not None else sys.stderr
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


class _Formatter(logging.Formatter):
    """'[arcopo_fast] message' for INFO, with the level for warnings and errors and the module for DEBUG."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if record.name == "py.warnings":  # "path:line: Category: text\n  source line" -> the text part
            msg = msg.strip().splitlines()[0]
        if record.levelno >= logging.WARNING:
            return f"[arcopo_fast] {record.levelname}: {msg}"
        if record.levelno < logging.INFO:
            return f"[arcopo_fast] {record.name}: {msg}"
        return f"[arcopo_fast] {msg}"


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def configure(level: str | int = "info", *, quiet: bool = False, stream=None) -> logging.Logger:
    """Send the package's log records (and Python warnings) to `stream` (default stderr) at `level`.
    quiet = warnings and errors only. Ranks other than 0 of a torchrun job log warnings and errors only,
    so that a line appears once. Calling it again replaces the previous set-up."""
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ValueError(f"log level must be one of {LEVELS}, got {level!r}")
        level = getattr(logging, level.upper())
    if quiet or _rank() != 0:
        level = max(level, logging.WARNING)
    _quiet_libraries(bars_only=not quiet)
    handler = _TqdmHandler(stream)
    handler.setFormatter(_Formatter())
    logging.captureWarnings(True)
    for name in (ROOT, "py.warnings"):
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if getattr(h, "_arcopo", False)]:
            logger.removeHandler(h)
        logger.addHandler(handler)
        logger.setLevel(level)
    return logging.getLogger(ROOT)


QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
"""What --quiet sets for the Hugging Face libraries (read when they are imported): errors only, no bars.
Without --quiet only their bars are switched off (HF_HUB_DISABLE_PROGRESS_BARS)."""


def _quiet_libraries(*, bars_only: bool = False) -> None:
    """transformers / diffusers log and draw loading bars on their own ("Loading weights" for a 2 MB text
    encoder, drawn through the entry points' own bars): no bars, and with --quiet errors only. Environment
    variables cover a later import; the libraries' own switches cover an earlier one."""
    for key, value in QUIET_ENV.items():
        if key == "HF_HUB_DISABLE_PROGRESS_BARS" or not bars_only:
            os.environ.setdefault(key, value)
    for name in ("transformers", "diffusers"):
        mod = sys.modules.get(f"{name}.utils.logging")
        if mod is not None:
            if not bars_only:
                mod.set_verbosity_error()
            mod.disable_progress_bar()


def progress_enabled() -> bool:
    """Whether progress bars should be drawn: unless the `arcopo_fast` logger was given a level above INFO
    (--quiet, --log-level warning, or the application's own set-up). Unconfigured: yes."""
    logger = logging.getLogger(ROOT)
    return logger.level == logging.NOTSET or logger.isEnabledFor(logging.INFO)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--log-level and --quiet, for every entry point."""
    group = parser.add_argument_group("logging")
    group.add_argument("--log-level", default="info", choices=LEVELS, type=str.lower,
                       help="how much to report on stderr (default: info; debug adds per-chunk progress)")
    group.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")


def configure_from_args(args: argparse.Namespace) -> logging.Logger:
    return configure(args.log_level, quiet=args.quiet)

"""Console and log-file set-up of the Hydra apps.

Hydra configures the root logger (``conf/hydra/default.yaml``: a console handler and the job's log file);
every app line goes through ``logging`` so it reaches both. This module makes Lightning's lines go the same
way (once each), writes console lines around progress bars, and silences third-party warnings the apps
cannot fix (each by its message and module).
"""

from __future__ import annotations

import logging
import sys
import warnings

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
"""Loggers to which Lightning attaches its own console handler on import."""

THIRD_PARTY_WARNINGS = (
    # Lightning 2.6 calls a torch pytree class that torch 2.13 deprecates; nothing in our code reaches it
    (
        FutureWarning,
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        r"lightning\.pytorch\.utilities\._pytree",
    ),
)
"""``(category, message regex, module regex)`` of third-party warnings the apps silence."""


class ConsoleHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write``: open progress bars are cleared, the line is
    written, and the bars are drawn again below it (instead of the line being glued to a bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def route_lightning_logs(load: bool = True) -> None:
    """Send Lightning's log lines to the root logger only, so each reaches the console once (through the
    root's console handler) and the job's log file. Lightning adds its own console handler on import; this
    removes it when the root logger has handlers (as in a Hydra app). ``load=False``: only if Lightning is
    already imported (its import takes seconds)."""
    if load:
        import lightning  # noqa: F401  (its import adds the handlers removed here)
    elif "lightning" not in sys.modules:
        return

    if not logging.getLogger().hasHandlers():
        return
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def silence_third_party_warnings() -> None:
    """Ignore the warnings in :data:`THIRD_PARTY_WARNINGS` (by message and module, nothing broader)."""
    for category, message, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def setup_app_logging(lightning: bool = False) -> None:
    """Called first in a Hydra app: third-party warnings silenced, Lightning's lines routed (``lightning``)."""
    silence_third_party_warnings()
    if lightning:
        route_lightning_logs()


def log_block(logger: logging.Logger, title: str, text: str) -> None:
    """Log a multi-line ``text`` (a table) under ``title``: the table starts on its own line, so its columns
    stay aligned under the log prefix."""
    logger.info("%s\n%s", title, text)

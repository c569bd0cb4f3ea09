"""Third-party noise kept off the terminal, so that what milkit says is seen.

Lightning prints hints that never apply to a milkit run (milkit logs to CSV, chooses its loader
workers and trains cohorts with few bags per epoch) and a deprecation of its own; they buried
the lines a user needs. :func:`filter_noise` drops exactly those messages; every other
warning still shows. ``milkit --verbose ...`` (or ``MILKIT_VERBOSE=1``) keeps them all.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

#: Set to 1 to see every third-party message (``milkit --verbose`` sets it).
VERBOSE_ENV = "MILKIT_VERBOSE"

#: Warnings (message regexes) that say nothing a milkit user can act on.
NOISE_WARNINGS = (
    r".*does not have many workers.*",  # milkit sizes its loaders itself
    r".*smaller than the logging interval.*",  # small cohorts: few bags per epoch
    r".*Total length of .* across ranks is zero.*",  # a run without validation bags
    r".*isinstance\(treespec, LeafSpec\)",  # Lightning's own deprecation
    r".*`tensorboardX` has been removed as a dependency.*",  # milkit logs to CSV
    # torchmetrics, once per metric and epoch on a one-class validation part: fit says it once
    r"No (negative|positive) samples in targets.*",
)
#: Lightning log lines (substrings) of the same kind.
NOISE_LOG_LINES = ("💡 Tip:", "to estimate number of stepping batches")
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


class _DropNoise(logging.Filter):
    """Drops the log records that contain one of :data:`NOISE_LOG_LINES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(line in message for line in NOISE_LOG_LINES)


def verbose() -> bool:
    """Whether the user asked to see every message."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def filter_noise() -> None:
    """Drop the noise warnings and log lines in this process (call it in worker processes
    too); does nothing in verbose mode."""
    if verbose():
        return
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", pattern)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        # Records of child loggers reach only the handlers, not the logger's own filters.
        for filterer in (logger, *logger.handlers):
            if not any(isinstance(existing, _DropNoise) for existing in filterer.filters):
                filterer.addFilter(_DropNoise())


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Raise Lightning's loggers to WARNING for the duration (no per-fold banners), unless
    in verbose mode."""
    if verbose():
        yield
        return
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)

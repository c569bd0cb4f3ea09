"""Running one stage over a folder of slides: shards, failure records, summaries.

A batch never dies on one bad slide (docs/design.md §8): each failure is appended to ``errors.csv``
at once (so a crash loses nothing), the batch goes on, and the command exits non-zero at the end
if anything failed.
"""

from __future__ import annotations

import csv
import os
import re
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from milkit.errors import ConfigError, MilkitError

T = TypeVar("T")

#: Per-slide outcomes in the order summaries print them.
OUTCOMES = ("done", "skipped", "no_tissue", "failed")


def parse_shard(text: str | None) -> tuple[int, int]:
    """Parse ``--shard I/N`` (``I`` counted from 0, as ``$SLURM_ARRAY_TASK_ID`` with ``--array=0-N-1``).

    Args:
        text: ``"I/N"`` or None for the whole list.

    Returns:
        ``(index, count)``; ``(0, 1)`` when ``text`` is None.
    """
    if text is None:
        return 0, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ConfigError(
            f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. --shard 0/4 ... --shard 3/4 "
            "(with SLURM: --array=0-3 and --shard $SLURM_ARRAY_TASK_ID/4)."
        )
    return int(match.group(1)), int(match.group(2))


def take_shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """Every ``count``-th item starting at ``index``: shards are disjoint and cover the list."""
    return list(items[index::count])


def shard_suffix(index: int, count: int) -> str:
    """File-name suffix that keeps concurrent shards from writing the same report files."""
    return "" if count == 1 else f".shard-{index}-of-{count}"


@dataclass
class ErrorLog:
    """``errors.csv``: one row per failure (slide, stage, error type, message), written at once.

    Args:
        path: The CSV to write; it is started fresh by each run.
    """

    path: Path
    count: int = 0

    def __post_init__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as handle:
            csv.writer(handle).writerow(["slide", "stage", "error", "message"])

    def record(self, slide: str | Path, stage: str, error: BaseException) -> str:
        """Append one failure; unexpected errors keep their last traceback line for context.

        Returns:
            The message written.
        """
        message = str(error)
        if not isinstance(error, MilkitError):
            message = (
                f"{message} ({traceback.format_exception_only(type(error), error)[-1].strip()})"
            )
        return self.record_message(slide, stage, type(error).__name__, message)

    def record_message(self, slide: str | Path, stage: str, error_name: str, message: str) -> str:
        """Append one failure given as text (e.g. reported by another process); returns it."""
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow([str(slide), stage, error_name, message])
            handle.flush()
            os.fsync(handle.fileno())
        self.count += 1
        return message


@dataclass
class BatchSummary:
    """Counts of per-slide outcomes, printed as one screen at the end of a batch.

    Args:
        stage: Name of the stage (``tile``, ``features``, ...).
    """

    stage: str
    outcomes: Counter[str] = field(default_factory=Counter)
    slides_by_outcome: dict[str, list[str]] = field(default_factory=dict)
    n_tiles: int = 0
    notes: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def add(
        self, slide_id: str, outcome: str, n_tiles: int = 0, *, error: str | None = None
    ) -> None:
        """Count one slide's outcome (one of :data:`OUTCOMES`), with a failure's message."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
        self.outcomes[outcome] += 1
        self.slides_by_outcome.setdefault(outcome, []).append(slide_id)
        self.n_tiles += n_tiles
        if error is not None:
            self.errors[slide_id] = error

    @property
    def failed(self) -> int:
        """Number of slides that failed."""
        return self.outcomes["failed"]

    def format(self, *, errors_path: Path | None = None, max_names: int = 5) -> str:
        """The summary as text: one line per outcome, naming a few slides where it helps."""
        total = sum(self.outcomes.values())
        lines = [f"milkit {self.stage}: {total} slide(s), {self.n_tiles} new tile(s)"]
        for outcome in OUTCOMES:
            count = self.outcomes[outcome]
            if not count:
                continue
            # a rerun's finished slides are reused, which "skipped" made read like a failure
            label = "already done" if outcome == "skipped" else outcome
            line = f"  {label:<10} {count}"
            names = self.slides_by_outcome[outcome]
            if outcome == "no_tissue":
                line += (
                    ": " + ", ".join(names[:max_names]) + (" ..." if len(names) > max_names else "")
                )
            lines.append(line)
            if outcome == "failed":  # the message is the useful part: the first line of each
                lines += [
                    f"    {name}: {_first_line(self.errors.get(name, 'see the errors file'))}"
                    for name in names[:max_names]
                ]
                lines += (
                    [f"    ... and {len(names) - max_names} more"] if len(names) > max_names else []
                )
        lines += [f"  {note}" for note in self.notes]
        if self.failed and errors_path is not None:
            lines.append(f"  failures are listed in {errors_path}")
        return "\n".join(lines)


def _first_line(message: str, max_chars: int = 200) -> str:
    """A failure message's first line, cut to ``max_chars``."""
    line = message.strip().splitlines()[0] if message.strip() else "(no message)"
    return line if len(line) <= max_chars else line[: max_chars - 3] + "..."

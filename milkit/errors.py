"""The one exception family of milkit.

Every message says what went wrong, which file, and what to do about it.
"""

from __future__ import annotations


class MilkitError(Exception):
    """Base class of every error milkit raises on purpose."""


class SlideOpenError(MilkitError):
    """A slide file cannot be opened (missing, empty, truncated, not a slide)."""


class MissingMppError(MilkitError):
    """A slide carries no microns-per-pixel metadata and none was given."""


class SlideReadError(MilkitError):
    """A region of an opened slide cannot be read (corrupt tile, I/O error)."""


class TilingError(MilkitError):
    """A tile grid cannot be planned (resolution unreachable, bad tile size)."""


class FeatureFileError(MilkitError):
    """A feature or coordinate file is missing, unfinished, stale or malformed."""


class EncoderError(MilkitError):
    """An encoder cannot be built (unknown id, gated weights, wrong checkpoint)."""


class LabelsError(MilkitError):
    """A labels CSV has problems; the message lists every bad row."""


class ConfigError(MilkitError):
    """A configuration value is invalid."""


class BagBatchError(MilkitError, ValueError):
    """A padded batch of bags is malformed.

    Raised when shapes disagree, the mask is not bool, or a bag has no real tile at all
    (attention over an empty bag is undefined).
    """


class TruthFileError(MilkitError):
    """A ground-truth file of a synthetic slide is missing or malformed."""

"""Synthetic H&E-like whole-slide images with ground truth: the project's test, demo and
benchmark data.

Slides are defined in physical space (µm), written as pyramidal JPEG TIFFs that OpenSlide opens,
and come with class and lymphocyte-density maps from which any tile's labels can be derived.
"""

from milkit.synth.cohort import (
    LABEL_COLUMNS,
    CohortSlide,
    SlideInfo,
    make_cohort,
    plan_cohort,
    write_slide,
)
from milkit.synth.layout import Layout, SlideParams, build_layout
from milkit.synth.organs import ORGANS
from milkit.synth.render import SlideRenderer
from milkit.synth.truth import (
    CLASS_NAMES,
    SlideTruth,
    TileTruth,
    load_truth,
    tile_truth,
    tissue_mask,
)

__all__ = [
    "CLASS_NAMES",
    "LABEL_COLUMNS",
    "ORGANS",
    "CohortSlide",
    "Layout",
    "SlideInfo",
    "SlideParams",
    "SlideRenderer",
    "SlideTruth",
    "TileTruth",
    "build_layout",
    "load_truth",
    "make_cohort",
    "plan_cohort",
    "tile_truth",
    "tissue_mask",
    "write_slide",
]

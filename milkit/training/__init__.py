"""milkit.training: the LightningModule of MIL heads, metrics, prediction writing, the CLI.

``milkit fit|validate|test|predict`` is :func:`milkit.training.cli.run_lightning`;
``milkit cv`` is :func:`milkit.training.cv.main`.
"""

from milkit.training.callbacks import PredictionWriter
from milkit.training.module import MILModule, SlidePrediction

__all__ = ["MILModule", "PredictionWriter", "SlidePrediction"]

"""milkit.training: the LightningModule of MIL heads, metrics, prediction files, the CLI.

``milkit fit|validate|test|predict`` is :func:`milkit.training.cli.run_lightning`;
``milkit cv`` is :func:`milkit.training.cv.main`; ``milkit continual`` is
:func:`milkit.training.continual.run.main`. The prediction file's writer and reader are
:mod:`milkit.training.prediction_file`.
"""

from milkit.training.callbacks import PredictionWriter
from milkit.training.module import MILModule, SlidePrediction

__all__ = ["MILModule", "PredictionWriter", "SlidePrediction"]

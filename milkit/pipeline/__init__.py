"""milkit.pipeline: the stages run over a folder of slides, the one layer that knows several.

``milkit tile`` is :mod:`~milkit.pipeline.tile`, ``milkit preprocess``
:mod:`~milkit.pipeline.preprocess` (one process) and :mod:`~milkit.pipeline.distributed`
(several devices through Lightning), ``milkit heatmap`` :mod:`~milkit.pipeline.heatmap`; all of
them share :mod:`~milkit.pipeline.batch` (shards, ``errors.csv``, the summary).
"""

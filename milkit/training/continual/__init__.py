"""milkit.training.continual: continual MIL over a sequence of tasks (CoMEL, docs/papers.md D).

``milkit continual`` is :func:`milkit.training.continual.run.main`. The task sequence
(:mod:`~milkit.training.continual.tasks`) reuses the datamodule's cohort and split rules; the
strategies (:mod:`~milkit.training.continual.strategies`, :mod:`~milkit.training.continual.baselines`)
decide what trains at each stage; :mod:`~milkit.training.continual.module` is the LightningModule,
:mod:`~milkit.training.continual.bppl` its instance pseudo-labels,
:mod:`~milkit.training.continual.metrics` and :mod:`~milkit.training.continual.results` the
evaluation after every stage and the files it leaves.
"""

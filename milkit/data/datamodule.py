"""The LightningDataModule of MIL training: a checked cohort, one fold's split, the loaders."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from milkit.data.bags import BAG_MEMORY, BagBatch, BagDataset, bag_loader
from milkit.data.cohort import Cohort, load_cohort
from milkit.data.labels import LabelTable, SlideLabel, TaskType
from milkit.data.splits import Split, make_split, quantile_strata
from milkit.data.statistics import FeatureStatistics, feature_statistics
from milkit.errors import ConfigError, LabelsError

Balance = Literal["none", "loss_weights", "sampler"]
SplitName = Literal["all", "train", "val", "test"]
_REGRESSION_STRATA = 4  # quantile bins that stratify regression folds


class MILDataModule(pl.LightningDataModule):
    """Bags of tile features with slide labels, split by patient into train/val/test.

    The cohort (labels CSV + feature files) is read and checked once, on first use of any
    property below or in :meth:`setup`; every problem is reported together before training.
    """

    def __init__(
        self,
        features_dir: str | Path,
        labels_csv: str | Path | None = None,
        target: str = "label",
        task: TaskType = "classification",
        class_names: list[str] | None = None,
        n_folds: int = 5,
        fold: int = 0,
        split_seed: int = 0,
        val_fraction: float = 0.2,
        max_tiles: int | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        balance: Balance = "none",
        target_scale: float = 1.0,
        tile_subset: str | None = None,
        predict_split: SplitName = "all",
        in_memory: bool | None = None,
        strict: bool = False,
    ) -> None:
        """Configure the data.

        Args:
            features_dir: Folder of ``<slide_id>.h5`` feature files (milkit, CLAM, TRIDENT or
                STAMP; ``features`` and ``coords`` are all that is needed).
            labels_csv: CSV with ``slide_id``, the target column and optionally
                ``patient_id``, ``fold`` or ``split``, ``task`` (docs/design.md §5). None only for
                ``predict`` over every file in ``features_dir`` (then give ``class_names``).
            target: Name of the target column.
            task: ``"classification"`` (class names) or ``"regression"`` (numbers).
            class_names: Classes in index order; default: the CSV's classes, sorted.
            n_folds: Number of generated folds K (when the CSV has no ``fold``/``split``).
            fold: Index of the held-out test fold.
            split_seed: Seed of the generated folds and validation part (one per CV repeat).
            val_fraction: Fraction of the training part (whole patients) used for validation.
            max_tiles: In training, a random subset of at most this many tiles per bag;
                None for all. Evaluation and prediction always use every tile.
            batch_size: Bags per batch (padded, with a mask).
            num_workers: DataLoader worker processes (none when the bags are in memory).
            balance: Class imbalance handling in training: ``"none"``, ``"loss_weights"``
                (inverse-frequency weights handed to the loss) or ``"sampler"`` (bags drawn
                with replacement, classes equally often).
            target_scale: Regression targets lie in ``[0, target_scale]`` and are learnt as
                ``target / target_scale`` (e.g. 100 for percentages).
            tile_subset: Name of a boolean ``(N,)`` dataset in every feature file (e.g. a
                tumour-bed mask, ``tumor_bed``): only its tiles form each bag, in training,
                evaluation and prediction. None uses every tile.
            predict_split: Which slides ``predict`` runs on: ``"all"`` or one part.
            in_memory: Keep the bags in memory after their first read, shared by every
                datamodule of the process (a cross-validation reads each file once), and read
                them without worker processes. None (default): when the cohort's features fit
                in a quarter of the machine's memory (at most 16 GiB).
            strict: Refuse slides without tiles (no tissue found) instead of leaving them out
                with one line on the terminal.
        """
        super().__init__()
        if batch_size < 1 or num_workers < 0 or (max_tiles is not None and max_tiles < 1):
            raise ConfigError(
                f"batch_size must be >= 1, num_workers >= 0 and max_tiles >= 1 or null; got "
                f"{batch_size}, {num_workers}, {max_tiles}."
            )
        if target_scale <= 0:
            raise ConfigError(f"target_scale must be > 0, got {target_scale}.")
        self.features_dir = Path(features_dir)
        self.labels_csv = Path(labels_csv) if labels_csv is not None else None
        self.target = target
        self.task = task
        self.given_class_names = list(class_names) if class_names is not None else None
        self.n_folds = n_folds
        self.fold = fold
        self.split_seed = split_seed
        self.val_fraction = val_fraction
        self.max_tiles = max_tiles
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.balance = balance
        self.target_scale = target_scale
        self.tile_subset = tile_subset
        self.predict_split = predict_split
        self.given_in_memory = in_memory
        self.strict = strict
        self._cohort: Cohort | None = None
        self._split: Split | None = None
        self._datasets: dict[str, BagDataset] = {}

    @property
    def cohort(self) -> Cohort:
        """The checked cohort (read on first access)."""
        if self._cohort is None:
            self._cohort = load_cohort(
                self.features_dir,
                self.labels_csv,
                target=self.target,
                task=self.task,
                class_names=self.given_class_names,
                target_range=(0.0, self.target_scale) if self.task == "regression" else None,
                tile_subset=self.tile_subset,
                strict=self.strict,
            )
        return self._cohort

    @property
    def feature_dim(self) -> int:
        """Feature length D of the cohort's files (linked to the model's ``in_dim``)."""
        return self.cohort.feature_dim

    @property
    def class_names(self) -> list[str] | None:
        """Class names in index order; None for regression."""
        names = self.cohort.class_names
        return list(names) if names is not None else None

    @property
    def n_classes(self) -> int:
        """Number of classes (linked to the model's ``n_classes``); 1 for regression.

        Raises:
            ConfigError: Classification without labels CSV or ``class_names``.
        """
        if self.task == "regression":
            return 1
        if self.class_names is None:
            raise ConfigError(
                "the number of classes is unknown without a labels CSV; give "
                "--data.class_names (in the order the model was trained with)."
            )
        return len(self.class_names)

    @property
    def encoder(self) -> str | None:
        """The encoder id recorded in the feature files."""
        return self.cohort.encoder

    @property
    def in_memory(self) -> bool:
        """Whether bags are kept in memory (see ``in_memory`` in the constructor)."""
        if self.given_in_memory is not None:
            return self.given_in_memory
        return cohort_bytes(self.cohort) <= BAG_MEMORY.max_bytes

    @property
    def split(self) -> Split:
        """This fold's train/val/test row indices into ``cohort.rows``."""
        if self._split is None:
            self._split = self._make_split()
        return self._split

    @property
    def class_weights(self) -> torch.Tensor | None:
        """``(C,)`` inverse-frequency loss weights of the training part (mean 1), when
        ``balance == "loss_weights"``; else None."""
        if self.balance != "loss_weights" or self.task != "classification":
            return None
        counts = np.bincount(self._targets(self.split.train), minlength=self.n_classes)
        weights = len(self.split.train) / (self.n_classes * np.maximum(counts, 1))
        return torch.tensor(weights, dtype=torch.float32)

    def feature_statistics(self) -> FeatureStatistics:
        """Per-dimension mean and standard deviation of the training part's tiles (every
        tile of every training bag; what the model standardises its input with)."""
        if "train" not in self._datasets:
            self._datasets["train"] = self._dataset("train")
        return feature_statistics(self._datasets["train"], seed=self.split_seed)

    def setup(self, stage: str) -> None:
        """Build the datasets a stage needs (checks the training part on ``fit``).

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.

        Raises:
            LabelsError: A training part with a single class.
            ConfigError: No labels CSV for a stage that needs targets.
        """
        if stage != "predict" and self.cohort.labels is None:
            raise ConfigError(f"{stage} needs targets: set --data.labels_csv.")
        parts = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for part in parts.get(stage, ("predict",)):
            if part not in self._datasets:
                self._datasets[part] = self._dataset(part)
        if stage == "fit":
            self._check_training_classes()

    def train_dataloader(self) -> DataLoader:
        """Shuffled training bags (or class-balanced draws with ``balance="sampler"``)."""
        dataset = self._datasets["train"]
        weights = None
        if self.balance == "sampler" and self.task == "classification":
            targets = np.asarray(dataset.targets)
            counts = np.bincount(targets, minlength=self.n_classes)
            weights = (1.0 / counts[targets]).tolist()
        return self._loader(dataset, shuffle=weights is None, draw_weights=weights)

    def val_dataloader(self) -> DataLoader | list:
        """Validation bags in file order; an empty list when there is no validation part."""
        dataset = self._datasets["val"]
        return self._loader(dataset, sampler=self._eval_sampler(dataset)) if len(dataset) else []

    def test_dataloader(self) -> DataLoader:
        """Held-out bags in file order (each rank a disjoint share under DDP)."""
        dataset = self._datasets["test"]
        return self._loader(dataset, sampler=self._eval_sampler(dataset))

    def predict_dataloader(self) -> DataLoader:
        """The ``predict_split`` bags in file order."""
        return self._loader(self._datasets["predict"])

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """Move a :class:`BagBatch`'s tensors, or hand it back as is when it is already there
        (Lightning's generic walk over the dataclass costs more than a small bag's step)."""
        if not isinstance(batch, BagBatch):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        if batch.features.device == device:
            return batch
        return replace(
            batch,
            features=batch.features.to(device, non_blocking=True),
            mask=batch.mask.to(device, non_blocking=True),
            coords=batch.coords.to(device, non_blocking=True),
            targets=batch.targets.to(device) if batch.targets is not None else None,
        )

    def rows_of(self, part: SplitName) -> np.ndarray:
        """Row indices into ``cohort.rows`` of a part (``"all"``: every row)."""
        if part == "all":
            return np.arange(len(self.cohort.rows))
        return getattr(self.split, part)

    def _make_split(self) -> Split:
        cohort = self.cohort
        if cohort.labels is None:
            raise ConfigError("splits need a labels CSV: set --data.labels_csv.")
        rows = cohort.rows
        if cohort.task == "regression":
            strata = quantile_strata([float(r.target) for r in rows], _REGRESSION_STRATA)  # type: ignore[arg-type]
        else:
            strata = np.array([str(r.target) for r in rows])
        return split_label_rows(
            cohort.labels,
            rows,
            strata,
            fold=self.fold,
            n_folds=self.n_folds,
            val_fraction=self.val_fraction,
            seed=self.split_seed,
        )

    def _targets(self, rows: np.ndarray) -> list:
        targets = self.cohort.targets()
        return [targets[i] for i in rows] if targets is not None else []

    def _dataset(self, part: str) -> BagDataset:
        rows = self.rows_of(self.predict_split if part == "predict" else part)  # type: ignore[arg-type]
        targets = self.cohort.targets()
        return BagDataset(
            [self.cohort.bags[i] for i in rows],
            [targets[i] for i in rows] if targets is not None else None,
            max_tiles=self.max_tiles,
            training=part == "train",
            tile_subset=self.tile_subset,
            in_memory=self.in_memory,
        )

    def validation_note(self) -> str | None:
        """A line for a classifier's validation part that holds a single class, where AUROC
        and the per-class metrics are undefined (torchmetrics logs them as 0); else None."""
        if self.task != "classification" or self.cohort.labels is None:
            return None
        rows = self.rows_of("val")
        targets = self.cohort.targets() or []
        classes = sorted({self.cohort.class_names[targets[i]] for i in rows})  # type: ignore[index]
        if len(rows) == 0 or len(classes) > 1:
            return None
        return (
            f"the validation part of fold {self.fold} holds {len(rows)} slide(s), all of class "
            f"{classes[0]!r}: its AUROC and per-class metrics mean nothing (logged as 0). Use "
            "fewer folds (--data.n_folds), a larger --data.val_fraction, or a fold/split column "
            "with every class in validation."
        )

    def _check_training_classes(self) -> None:
        if self.task != "classification":
            return
        train = self._datasets["train"]
        counts = Counter(self.cohort.class_names[t] for t in train.targets or [])  # type: ignore[index]
        if len(counts) < 2:
            rows = self.cohort.rows
            lines = sorted(rows[i].line for i in self.split.train)
            raise LabelsError(
                f"{self.labels_csv}: the training part of fold {self.fold} holds "
                f"{dict(counts) or 'no slides'} (lines {_ranges(lines)}); a classifier needs at "
                "least two classes. Add slides of the other classes, fewer folds, or fix the "
                "fold/split column."
            )

    def _loader(
        self,
        dataset: BagDataset,
        *,
        shuffle: bool = False,
        draw_weights: list[float] | None = None,
        sampler: torch.utils.data.Sampler | None = None,
    ) -> DataLoader:
        return bag_loader(
            dataset,
            batch_size=self.batch_size,
            num_workers=0 if dataset.in_memory else self.num_workers,
            shuffle=shuffle,
            draw_weights=draw_weights,
            sampler=sampler,
        )

    def _eval_sampler(self, dataset: BagDataset) -> DistributedSampler | None:
        """Under DDP, each rank evaluates a disjoint share with no repeated bag, so the metrics
        torchmetrics syncs are those of the whole part."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        return _UnrepeatedSampler(
            dataset, num_replicas=trainer.world_size, rank=trainer.global_rank
        )


class _UnrepeatedSampler(DistributedSampler):
    """Rank r takes items r, r + W, r + 2W, ... (shares differ by at most one; no padding)."""

    def __init__(self, dataset: BagDataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.num_samples


def cohort_bytes(cohort: Cohort) -> int:
    """Bytes the cohort's features take in memory (as float32, the larger stored type)."""
    return sum(bag.n_tiles * (bag.feature_dim * 4 + 16) for bag in cohort.bags)


def _ranges(lines: Sequence[int]) -> str:
    """``[2, 3, 4, 7]`` -> ``"2-4, 7"``."""
    parts: list[str] = []
    for line in lines:
        if parts and parts[-1].split("-")[-1] == str(line - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{line}"
        else:
            parts.append(str(line))
    return ", ".join(parts)


def split_label_rows(
    table: LabelTable | None,
    rows: Sequence[SlideLabel],
    strata: Sequence[Any] | np.ndarray,
    *,
    fold: int,
    n_folds: int,
    val_fraction: float,
    seed: int,
) -> Split:
    """The train/val/test split of labelled slides, as every milkit run makes it.

    Patients are never cut; a ``fold`` or ``split`` column of the labels CSV wins over the
    computed folds (:func:`milkit.data.splits.make_split`).

    Args:
        table: The labels CSV the rows come from (which optional columns it has), if any.
        rows: The slides to split, in cohort order.
        strata: One stratum per row (class label, or a quantile bin of a regression target).
        fold: The held-out fold.
        n_folds: Folds of the cross-validation.
        val_fraction: Part of the training folds kept for validation.
        seed: Seed of the fold assignment.

    Returns:
        Row indices of each part.
    """
    return make_split(
        strata,
        [row.patient_id for row in rows],
        fold=fold,
        n_folds=n_folds,
        val_fraction=val_fraction,
        seed=seed,
        folds=[row.fold for row in rows] if table and table.has_fold else None,  # type: ignore[misc]
        splits=[row.split for row in rows] if table and table.has_split else None,  # type: ignore[misc]
    )

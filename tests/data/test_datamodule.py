"""MILDataModule: folds by patient, training checks, class balance, loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from milkit.data.datamodule import MILDataModule, _UnrepeatedSampler
from milkit.errors import ConfigError, LabelsError
from milkit.synth.features import write_witness_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    return write_witness_cohort(
        tmp_path_factory.mktemp("cohort"), n_bags=30, n_tiles=(5, 12), feature_dim=6,
        n_witnesses=(1, 2), slides_per_patient=2, positive_fraction=0.3, seed=2,
    )  # fmt: skip


def test_properties_come_from_the_cohort(cohort) -> None:
    data = MILDataModule(cohort.features_dir, cohort.labels_csv)
    assert data.feature_dim == 6 and data.n_classes == 2
    assert data.class_names == ["negative", "positive"] and data.encoder is None


def test_folds_hold_out_whole_patients_and_cover_the_cohort(cohort) -> None:
    tested = []
    for fold in range(3):
        data = MILDataModule(
            cohort.features_dir, cohort.labels_csv, n_folds=3, fold=fold, split_seed=4
        )
        rows = data.cohort.rows
        split = data.split
        patients = [
            {rows[i].patient_id for i in part} for part in (split.train, split.val, split.test)
        ]
        assert not (
            patients[0] & patients[2] or patients[1] & patients[2] or patients[0] & patients[1]
        )
        tested += [rows[i].slide_id for i in split.test]
    assert sorted(tested) == sorted(cohort.labels)


def test_loaders_batch_pad_and_subsample(cohort) -> None:
    data = MILDataModule(cohort.features_dir, cohort.labels_csv, batch_size=4, max_tiles=6)
    data.setup("fit")
    train = next(iter(data.train_dataloader()))
    assert train.features.shape[0] == 4 and train.features.shape[1] <= 6
    assert train.mask.sum(dim=1).max() == train.features.shape[1]
    val = data.val_dataloader()
    assert sum(len(batch) for batch in val) == len(data.split.val)
    longest = max(cohort.witnesses[s].size for b in val for s in b.slide_ids)
    assert max(b.features.shape[1] for b in val) == longest  # every tile at evaluation


def test_single_class_training_part_is_refused(tmp_path: Path, cohort) -> None:
    labels = tmp_path / "labels.csv"
    rows = cohort.labels_csv.read_text().splitlines()
    # Only patient_0000's slides keep their class in the training folds: put all positives in fold 0.
    header, body = rows[0] + ",fold", rows[1:]
    labels.write_text(
        "\n".join([header] + [f"{r},{0 if r.endswith('positive') else 1}" for r in body]) + "\n"
    )
    data = MILDataModule(cohort.features_dir, labels, fold=0)
    with pytest.raises(LabelsError, match=r"training part of fold 0 holds \{'negative': \d+\}"):
        data.setup("fit")


def test_class_weights_and_balanced_sampler(cohort) -> None:
    weighted = MILDataModule(cohort.features_dir, cohort.labels_csv, balance="loss_weights")
    weighted.setup("fit")
    targets = np.asarray(weighted._datasets["train"].targets)
    counts = np.bincount(targets, minlength=2)
    weights = weighted.class_weights
    assert torch.allclose(
        weights * torch.tensor(counts, dtype=torch.float32), torch.tensor(len(targets) / 2.0)
    )
    assert MILDataModule(cohort.features_dir, cohort.labels_csv).class_weights is None

    balanced = MILDataModule(cohort.features_dir, cohort.labels_csv, balance="sampler")
    balanced.setup("fit")
    loader = balanced.train_dataloader()
    drawn = [int(batch.targets[0]) for _ in range(20) for batch in loader]  # 20 epochs
    assert abs(np.mean(drawn) - 0.5) < 0.1  # positives are 30 % of the cohort


def test_predict_without_labels_needs_class_names(cohort) -> None:
    data = MILDataModule(cohort.features_dir)
    with pytest.raises(ConfigError, match="--data.class_names"):
        _ = data.n_classes
    with pytest.raises(ConfigError, match="set --data.labels_csv"):
        data.setup("fit")
    named = MILDataModule(cohort.features_dir, class_names=["negative", "positive"])
    named.setup("predict")
    batches = list(named.predict_dataloader())
    assert named.n_classes == 2 and len(batches) == 30 and batches[0].targets is None


def test_predict_split_selects_the_held_out_part(cohort) -> None:
    data = MILDataModule(cohort.features_dir, cohort.labels_csv, predict_split="test")
    data.setup("predict")
    ids = [s for batch in data.predict_dataloader() for s in batch.slide_ids]
    assert ids == [data.cohort.rows[i].slide_id for i in data.split.test]


def test_eval_sampler_partitions_without_repeats() -> None:
    dataset = list(range(7))
    shares = [list(_UnrepeatedSampler(dataset, num_replicas=3, rank=r)) for r in range(3)]  # type: ignore[arg-type]
    assert sorted(sum(shares, [])) == dataset and [len(s) for s in shares] == [3, 2, 2]


def test_bad_options_are_config_errors(cohort) -> None:
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        MILDataModule(cohort.features_dir, cohort.labels_csv, batch_size=0)
    with pytest.raises(ConfigError, match="target_scale must be > 0"):
        MILDataModule(cohort.features_dir, cohort.labels_csv, target_scale=0)

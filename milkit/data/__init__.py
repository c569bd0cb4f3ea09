"""milkit.data: labels, patient-grouped splits, bags of tile features, the LightningDataModule."""

from milkit.data.bags import BagBatch, BagDataset, BagInfo, BagItem, collate_bags, probe_bag
from milkit.data.cohort import Cohort, load_cohort
from milkit.data.datamodule import MILDataModule
from milkit.data.labels import LabelTable, SlideLabel, class_names_of, read_labels
from milkit.data.splits import Split, make_split, quantile_strata, stratified_group_folds

__all__ = [
    "BagBatch",
    "BagDataset",
    "BagInfo",
    "BagItem",
    "Cohort",
    "LabelTable",
    "MILDataModule",
    "SlideLabel",
    "Split",
    "class_names_of",
    "collate_bags",
    "load_cohort",
    "make_split",
    "probe_bag",
    "quantile_strata",
    "read_labels",
    "stratified_group_folds",
]

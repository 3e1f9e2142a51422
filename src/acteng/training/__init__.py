"""Representation training: weight edits driven by losses on activations.

`train_rmu` (RMU unlearning) saves a PEFT adapter folder with acteng's provenance
(`adapters`); `diff_vector` reads what any adapter changed as a steering vector, so the
monitor, the logit lens and the detectors can watch for it.
"""

from acteng.training.adapters import read_provenance, record_figures, save_weight_edits
from acteng.training.data import (
    default_retain_texts,
    load_mc,
    load_texts,
    neutral_texts,
    unlearning_domains,
)
from acteng.training.diff import diff_vector
from acteng.training.merge import merge_adapter
from acteng.training.rmu import RMUResult, default_rmu_layer, train_rmu

__all__ = [
    "RMUResult",
    "default_retain_texts",
    "default_rmu_layer",
    "diff_vector",
    "load_mc",
    "load_texts",
    "merge_adapter",
    "neutral_texts",
    "read_provenance",
    "record_figures",
    "save_weight_edits",
    "train_rmu",
    "unlearning_domains",
]

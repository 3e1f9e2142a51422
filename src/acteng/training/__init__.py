"""Representation training: weight edits driven by losses on activations.

`train_circuit_breaker` (representation rerouting) and `train_rmu` (RMU unlearning) save
a PEFT adapter folder with acteng's provenance (`adapters`); `diff_vector` reads what any
adapter changed as a steering vector, so the monitor, the logit lens and the detectors can
watch for it.
"""

from acteng.training.adapters import read_provenance, record_figures, save_weight_edits
from acteng.training.circuit_breaker import (
    CircuitBreakerResult,
    default_circuit_breaker_layers,
    model_answers,
    train_circuit_breaker,
)
from acteng.training.data import (
    circuit_breaker_sets,
    default_retain_texts,
    load_conversations,
    load_mc,
    load_texts,
    neutral_texts,
    pair_conversation,
    unlearning_domains,
)
from acteng.training.diff import diff_vector
from acteng.training.merge import merge_adapter
from acteng.training.rmu import RMUResult, default_rmu_layer, train_rmu

__all__ = [
    "CircuitBreakerResult",
    "RMUResult",
    "circuit_breaker_sets",
    "default_circuit_breaker_layers",
    "default_retain_texts",
    "default_rmu_layer",
    "diff_vector",
    "load_conversations",
    "load_mc",
    "load_texts",
    "merge_adapter",
    "model_answers",
    "neutral_texts",
    "pair_conversation",
    "read_provenance",
    "record_figures",
    "save_weight_edits",
    "train_circuit_breaker",
    "train_rmu",
    "unlearning_domains",
]

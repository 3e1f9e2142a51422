"""Measuring a steering setting and choosing one.

- `metrics`, `tax`, `reliability`: behaviour shift, the alignment tax, reliability.
- `analysis`: what a vector promotes, where a concept is readable, how vectors relate.
- `measures`: `evaluate`, all of the above for one setting.
- `splits`: which pairs are fit on and which measured on (held out, or a test set).
- `scoring`: a setting's held-out effect and perplexity tax, here or on a backend's pool.
- `sweep`: every method x layer x coefficient; `tune`: the best setting within a budget.
"""

from acteng.evaluation.analysis import (
    layer_cosines,
    pca_scatter,
    readability,
    vector_cosines,
    vocab_projection,
)
from acteng.evaluation.measures import evaluate
from acteng.evaluation.metrics import ab_match, logprob_margin, prompting_baseline
from acteng.evaluation.reliability import pair_diagnostics, steerability
from acteng.evaluation.sweep import SweepResult, sweep
from acteng.evaluation.tax import load_eval, mc_accuracy, perplexity
from acteng.evaluation.tune import TuneResult, tune

# What the README teaches; each module's own __all__ has the rest.
__all__ = [
    "SweepResult",
    "TuneResult",
    "ab_match",
    "evaluate",
    "layer_cosines",
    "load_eval",
    "logprob_margin",
    "mc_accuracy",
    "pair_diagnostics",
    "pca_scatter",
    "perplexity",
    "prompting_baseline",
    "readability",
    "steerability",
    "sweep",
    "tune",
    "vector_cosines",
    "vocab_projection",
]

"""Measuring a steering setting and choosing one.

- `metrics`, `tax`, `reliability`: behaviour shift, the alignment tax, reliability.
- `analysis`: what a vector promotes, where a concept is readable, how vectors relate.
- `measures`: `evaluate`, all of the above for one setting.
- `scoring`: a setting's held-out effect and perplexity tax, here or on a backend's pool.
- `sweep`: every method x layer x coefficient; `tune`: the best setting within a budget.
"""

from acteng.evaluation.measures import evaluate
from acteng.evaluation.sweep import SweepResult, sweep
from acteng.evaluation.tune import TuneResult, tune

__all__ = ["SweepResult", "TuneResult", "evaluate", "sweep", "tune"]

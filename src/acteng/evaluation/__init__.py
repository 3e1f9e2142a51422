"""Measuring a steering setting and choosing one.

- `metrics`, `tax`, `reliability`: behaviour shift, the alignment tax, reliability.
- `analysis`: what a vector promotes, where a concept is readable, how vectors relate.
- `measures`: `evaluate`, all of the above for one setting.
- `tuning`: `sweep` (layer x coefficient grid) and `tune` (the best setting in a budget).
"""

from acteng.evaluation.measures import evaluate
from acteng.evaluation.tuning import SweepResult, TuneResult, sweep, tune

__all__ = ["SweepResult", "TuneResult", "evaluate", "sweep", "tune"]

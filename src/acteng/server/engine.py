"""The serving engine: continuous batching of requests that each carry their own steering.

One thread owns the model. Requests wait in a bounded queue; at every step boundary the
engine admits as many as there are free slots (prefilling each alone), then runs one
decoding step for all slots at once. A row leaves when it finishes, is cancelled (the
client went away) or fails, and its slot is free for the next request at once.

Per-row steering comes from a `SteeringTable` (one slot per row); monitors and the guard's
running score read the residual stream through hooks on the same forward calls (the
library's `Readout`, via `LayerMeans`). Hooks and the slot attention are attached for the
length of one forward call only, so the model is untouched between steps and a failing
step cannot leave anything applied.

Greedy results do not depend on the batch: see `acteng.server.slots` for why and how.

On CUDA in bf16/fp16 (or with ``compiled=True``) the decoding steps run as one compiled
graph instead (`acteng.server.compiled_step`): its hooks stay attached until `stop`, do
nothing outside those steps, and steering and monitoring are traced into the graph.
"""

from __future__ import annotations

import logging
import queue
import threading
from contextlib import ExitStack
from typing import Any

import torch

from acteng.errors import ActengError, ConfigError, EngineBusy
from acteng.hooks import hooked
from acteng.models import Model
from acteng.monitoring import LayerMeans, Readout
from acteng.server.compiled_step import CompiledDecoder
from acteng.server.events import Event, Job, Sink
from acteng.server.requests import GenerationRequest
from acteng.server.rows import Row
from acteng.server.slots import SlotBatch, SlotCache, check_supported, slot_attention_enabled
from acteng.steering.compiled import wants_compiled
from acteng.steering.table import SteeringTable

# EngineBusy, Event, Job and Sink live in acteng.errors and acteng.server.events; they
# are re-exported here, where the servers and tests have always imported them.
__all__ = ["Engine", "EngineBusy", "Event", "Job", "Sink"]

log = logging.getLogger(__name__)


class Engine:
    """Continuous-batching generation with per-row steering, monitors and guards.

    The engine owns the model while it runs: during each forward call it routes the
    model's attention through the slot attention, so nothing else may run the same model
    object at that moment (load a second one for other work).

    `compiled` (None: on CUDA in half precision, or as ``ACTENG_COMPILE`` says) decodes
    with `CompiledDecoder`; `compile_options` (backend, mode) go to ``torch.compile``.
    `monitors` bounds the monitors one request may read on that path (the request
    limit's 8 plus a guard's).

    >>> engine = Engine(acteng.load_model(), slots=16)
    >>> engine.start(); job = engine.submit(request, print); ...; engine.stop()
    """

    def __init__(
        self,
        model: Model,
        *,
        slots: int = 16,
        context: int = 1024,
        max_queue: int = 256,
        terms: int = 8,
        fixed_batch: bool = True,
        compiled: bool | None = None,
        monitors: int = 9,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        self.inner = check_supported(model)  # the attention each row runs
        if slots < 1 or context < 8:
            raise ActengError(f"need slots >= 1 and context >= 8, got {slots} and {context}")
        use_compiled = wants_compiled(model) if compiled is None else compiled
        if use_compiled and not fixed_batch:
            raise ConfigError("the compiled engine decodes every slot each step; keep fixed_batch")
        self.model = model
        self.slots = slots
        self.context = context
        self.fixed_batch = fixed_batch
        self.table = SteeringTable(model, slots, terms=terms)
        self.cache = SlotCache(model.num_layers, slots, context, zeroed=use_compiled)
        self.rows: list[Row | None] = [None] * slots
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.steps = 0  # decoding steps run (for tests and statistics)
        self.max_rows_seen = 0
        # transformers renamed `past_key_values` to `cache`; pass whichever this one takes.
        import inspect

        params = inspect.signature(model.hf.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.decoder: CompiledDecoder | None = None
        if use_compiled:
            self.decoder = CompiledDecoder(
                model,
                self.table,
                self.cache,
                monitors=monitors,
                cache_arg=self._cache_arg,
                inner=self.inner,
                **(compile_options or {}),
            )

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        if self.decoder is not None:
            self.decoder.open()  # after a stop (its graphs then compile once more)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="acteng-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        for i, row in enumerate(self.rows):  # rows cut short by the shutdown
            if row is not None:
                self._free(i)
                row.job.sink(Event("error", status=503, text="server stopping"))
        while True:  # whoever still waits gets an answer
            try:
                self.queue.get_nowait().sink(Event("error", status=503, text="server stopping"))
            except queue.Empty:
                break
        if self.decoder is not None:
            self.decoder.close()

    def submit(self, request: GenerationRequest, sink: Sink) -> Job:
        """Queue `request`; events go to `sink` from the engine thread."""
        job = Job(request, sink)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise EngineBusy(
                f"the server is busy ({self.queue.maxsize} requests waiting); retry shortly"
            ) from None
        return job

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    # --- the loop --------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                if self.active:
                    self._step()
            except Exception as exc:  # a bug must not kill the server: fail the batch
                log.exception("engine step failed")
                self._fail_all(f"internal error while generating: {exc}")

    def _admit(self) -> None:
        idle = self.active == 0
        for index in range(self.slots):
            if self.rows[index] is not None:
                continue
            try:
                job = self.queue.get(timeout=0.05) if idle else self.queue.get_nowait()
            except queue.Empty:
                return
            idle = False
            if job.cancelled.is_set():
                continue
            try:
                self._start(job, index)
            except ActengError as exc:
                self._free(index)
                job.sink(Event("error", status=400, text=str(exc)))
            except Exception as exc:
                log.exception("prefill failed")
                self._free(index)
                job.sink(Event("error", status=500, text=f"internal error: {exc}"))

    def _start(self, job: Job, index: int) -> None:
        """Guard check, steering and prefill of one new request in cache row `index`."""
        request = job.request
        row = Row(job, index, self.model)
        if row.check_prompt_guard() == "stop":  # blocked or stopped before generating
            row.finish("content_filter")
            return
        self.rows[index] = row
        self.table.set(index + 1, row.steering(), prompt_len=len(request.prompt_ids))
        if self.decoder is not None:
            self.decoder.monitors.set(index + 1, row.monitored())
        ids = torch.tensor([request.prompt_ids], device=self.model.device)
        positions = torch.arange(ids.shape[1], device=self.model.device)[None]
        batch = SlotBatch(
            slots=torch.tensor([index]),
            starts=torch.tensor([0]),
            active=torch.tensor([True]),
            inner=self.inner,
        )
        table_rows = torch.tensor([index + 1])
        logits, scores = self._forward(ids, positions, batch, table_rows, [row])
        row.prefilled(logits[0], scores[0])
        self.max_rows_seen = max(self.max_rows_seen, self.active)
        if row.done:
            self._free(index)

    def _step(self) -> None:
        """One decoding step for the live rows.

        With `fixed_batch` (the default) every slot takes part, empty ones as dummy rows, so
        the matmuls always see the same number of rows and a row's result never depends on
        the others; without it only live rows run (cheaper when few requests run, but the
        last bits, and so sometimes the greedy text, can then change with the batch).
        """
        pad = int(self.model.tokenizer.pad_token_id)
        rows = self.rows
        order = [i for i, r in enumerate(rows) if self.fixed_batch or r is not None]
        picked = [rows[i] for i in order]
        inputs = [r.next_input if r else pad for r in picked]
        lengths = [r.length if r else 0 for r in picked]
        if self.decoder is not None:  # order is every slot
            logits, scores = self.decoder.step(inputs, lengths, [r is not None for r in picked])
        else:
            device = self.model.device
            starts = torch.tensor(lengths)
            batch = SlotBatch(
                slots=torch.tensor(order),
                starts=starts,
                active=torch.tensor([r is not None for r in picked]),
                inner=self.inner,
            )
            live = [r for r in picked if r is not None]
            table_rows = torch.tensor([i + 1 if rows[i] is not None else 0 for i in order])
            ids = torch.tensor([[token] for token in inputs], device=device)
            logits, scores = self._forward(ids, starts.to(device)[:, None], batch, table_rows, live)
        self.steps += 1
        for k, i in enumerate(order):
            row = rows[i]
            if row is None:
                continue
            if row.job.cancelled.is_set():
                row.done = True
            else:
                row.decoded(logits[k], scores[k])
            if row.guard_steer_pending:
                row.guard_steer_pending = False
                prompt_len = len(row.job.request.prompt_ids)
                self.table.set(i + 1, row.steering(), prompt_len=prompt_len)
            if row.done:
                self._free(i)

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        batch: SlotBatch,
        table_rows: torch.Tensor,
        live: list[Row],
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """One eager forward call: slot attention, per-row steering and readouts.

        ids, positions: [batch, q]; `table_rows`: [batch] steering-table slot of each row
        (0: unsteered). Returns the last position's logits [batch, vocab] and, per batch
        row, the monitor scores (key -> [q]).
        """
        model = self.model
        monitored = {m.key: Readout(m.units, m.detector) for r in live for m in r.monitored()}
        readout = LayerMeans(monitored)
        self.cache.batch = batch
        try:
            with torch.no_grad(), ExitStack() as stack:
                stack.enter_context(slot_attention_enabled(model))
                stack.enter_context(self.table.applied(model, table_rows))
                fns = readout.block_fns()
                if fns:
                    stack.enter_context(hooked(model.hf, model.blocks, fns, track_positions=True))
                output = model.hf(
                    input_ids=ids,
                    position_ids=positions,
                    use_cache=True,
                    logits_to_keep=1,
                    acteng_slots=batch,
                    **{self._cache_arg: self.cache},
                )
        finally:
            self.cache.batch = None
        scores = readout.scores()
        per_row = [{key: v[i] for key, v in scores.items()} for i in range(ids.shape[0])]
        return output.logits[:, -1].float(), per_row

    def _free(self, index: int) -> None:
        self.rows[index] = None
        self.table.clear(index + 1)
        if self.decoder is not None:
            self.decoder.monitors.clear(index + 1)

    def _fail_all(self, message: str) -> None:
        for i, row in enumerate(self.rows):
            if row is not None:
                self._free(i)  # before telling the client, which may look at once
                row.job.sink(Event("error", status=500, text=message))

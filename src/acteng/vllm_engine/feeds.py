"""Pairing vLLM's tokens with the worker's scores for one monitored request.

vLLM samples in its own processes and sends tokens; acteng's plugin files each token's
monitor scores in the worker (`acteng.vllm_engine.monitors`), collected separately. The
transformers engine's `Row` wants them as its engine produces them: the prompt's scores
with the first token, then each generated token's scores (read when it is fed back)
before the token sampled after it. `MonitorFeed` holds what arrived and hands it to the
row in that order, so the row's monitors, guard verdicts, streaming and stop strings are
the transformers engine's own code.

A row reading scores asks vLLM for one token more than its ``max_tokens``: the step that
samples it is the one that scores the last token the row keeps (the transformers engine
feeds that token once more for the same reason); the extra token is never shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from acteng.server.rows import Row

__all__ = ["MonitorFeed"]


@dataclass
class MonitorFeed:
    """The tokens and scores of one monitored request not yet given to its row."""

    req_id: str  # vLLM's id of the request, the one its worker files scores under
    keys: list[str]  # the row's monitor keys, in the worker's column order
    tokens: list[int] = field(default_factory=list)  # every token vLLM sampled so far
    scores: dict[int, list[float]] = field(default_factory=dict)  # position -> per column
    finished: str | None = None  # vLLM's finish reason, once it ended the request
    started: bool = False  # the prompt's scores and first token went to the row

    def add_scores(self, chunks: list[Any]) -> None:
        """Chunks from `RunnerMonitors.take`: [first position, [[score per column], ...]]."""
        for position, rows in chunks:
            for offset, values in enumerate(rows):
                self.scores[int(position) + offset] = [float(v) for v in values]

    def _at(self, positions: range) -> dict[str, torch.Tensor]:
        columns = [self.scores.pop(p) for p in positions]
        return {
            key: torch.tensor([c[k] for c in columns], dtype=torch.float64)
            for k, key in enumerate(self.keys)
        }

    def advance(self, row: Row) -> None:
        """Give `row` everything that is complete, in the order its engine would."""
        prompt_len = len(row.request.prompt_ids)
        if not self.started:
            prompt = range(prompt_len)
            if not self.tokens or any(p not in self.scores for p in prompt):
                return self._settle(row)
            self.started = True
            row.prompt_scored(self._at(prompt))
            row.sampled(self.tokens[0])
        while not row.done:
            fed = row.fed  # generated token `fed` is scored next, at its own position
            position = prompt_len + fed
            if position not in self.scores:
                break
            if not row.final_feed and len(self.tokens) <= fed + 1:
                break  # the token sampled after it has not come yet
            if row.scored(self._at(range(position, position + 1))):
                row.sampled(self.tokens[fed + 1])
        self._settle(row)

    def _settle(self, row: Row) -> None:
        # vLLM ended the request and nothing more will come (its last token is never
        # scored): end the row as vLLM did. Normally the row ended first.
        if not row.done and self.finished is not None:
            row.finish("length" if self.finished == "length" else "stop")

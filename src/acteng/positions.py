"""Token positions: where activations are read, and where steering applies.

Read positions (building a vector) pick tokens inside one text:
  ``last``   the last token;
  ``mean``   the mean over the completion's tokens (the whole text when there is no prompt);
  ``answer`` the token holding the answer letter of an A/B completion (its first
             alphanumeric character).

Steering positions pick tokens during a forward pass or generation:
  ``all`` (default), ``prompt``, ``generated``, or a window ``"start:end"`` over token
  indices counted from the row's first real token (left padding excluded). Negative bounds
  count back from the end of the prompt: ``"-1:"`` is the last prompt token and everything
  generated after it. "generated" tokens are those fed back in after the prompt, so the
  first generated token is produced unsteered under ``generated``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, overload

import torch

from acteng.errors import ConfigError

__all__ = [
    "READ_POSITIONS",
    "Positions",
    "ReadPosition",
    "ReadSpan",
    "parse_positions",
    "read_span",
]

ReadPosition = Literal["last", "mean", "answer"]
# The end of an open position range (`Positions.bounds`): beyond any context length.
UNBOUNDED = 2**62
READ_POSITIONS: tuple[str, ...] = ("last", "mean", "answer")


@dataclass(frozen=True)
class ReadSpan:
    """Token range [start, end) of a text whose activations are averaged."""

    start: int
    end: int


def read_span(
    offsets: list[tuple[int, int]],
    position: str,
    *,
    completion_start: int = 0,
    text: str = "",
) -> ReadSpan:
    """Token span to read for one tokenised text.

    `offsets` are the tokenizer's (char_start, char_end) per token; `completion_start` is
    the character where the completion begins (0 when the text has no prompt).
    """
    n = len(offsets)
    if n == 0:
        raise ConfigError("cannot read activations of an empty text; remove empty texts")
    if position == "last":
        return ReadSpan(n - 1, n)
    # Tokens whose characters end after the completion starts belong to the completion.
    first = next((i for i, (_, end) in enumerate(offsets) if end > completion_start), n - 1)
    if position == "mean":
        return ReadSpan(first, n)
    if position == "answer":
        match = re.search(r"[A-Za-z0-9]", text[completion_start:])
        if match is None:
            raise ConfigError(
                f"position 'answer' needs a letter or digit in the completion, found none in "
                f"{text[completion_start:]!r}; use position 'last' or 'mean'"
            )
        char = completion_start + match.start()
        for i, (start, end) in enumerate(offsets):
            if start <= char < end:
                return ReadSpan(i, i + 1)
        return ReadSpan(first, first + 1)
    raise ConfigError(f"unknown read position {position!r}; use one of {', '.join(READ_POSITIONS)}")


@dataclass(frozen=True)
class Positions:
    """Which tokens a steering operation touches (see the module docstring)."""

    kind: Literal["all", "prompt", "generated", "window"] = "all"
    start: int | None = None
    end: int | None = None

    def __str__(self) -> str:
        if self.kind != "window":
            return self.kind
        return f"{'' if self.start is None else self.start}:{'' if self.end is None else self.end}"

    def mask(self, token_index: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
        """Boolean [batch, q] mask of the tokens to steer.

        token_index: [batch, q] index of each token in its row (-1 for padding).
        prompt_len:  [batch] number of real prompt tokens per row.
        """
        real = token_index >= 0
        if self.kind == "all":
            return real
        plen = prompt_len[:, None]
        if self.kind == "prompt":
            return real & (token_index < plen)
        if self.kind == "generated":
            return token_index >= plen
        lo = _bound(self.start, plen, default=torch.zeros_like(plen))
        hi = _bound(self.end, plen, default=None)
        keep = real & (token_index >= lo)
        return keep if hi is None else keep & (token_index < hi)

    def bounds(self, prompt_len: int) -> tuple[int, int]:
        """The token-index range ``[lo, hi)`` these positions cover in one row.

        The same tokens as `mask` for a row with `prompt_len` prompt tokens; `hi` is
        `UNBOUNDED` when the range runs to the end. Per-row tables store these numbers.
        """
        if self.kind == "all":
            return 0, UNBOUNDED
        if self.kind == "prompt":
            return 0, prompt_len
        if self.kind == "generated":
            return prompt_len, UNBOUNDED

        def resolve(value: int | None, default: int) -> int:
            if value is None:
                return default
            return max(prompt_len + value, 0) if value < 0 else value

        return resolve(self.start, 0), resolve(self.end, UNBOUNDED)


@overload
def _bound(value: int | None, plen: torch.Tensor, default: torch.Tensor) -> torch.Tensor: ...
@overload
def _bound(value: int | None, plen: torch.Tensor, default: None) -> torch.Tensor | None: ...
def _bound(
    value: int | None, plen: torch.Tensor, default: torch.Tensor | None
) -> torch.Tensor | None:
    if value is None:
        return default
    return plen + value if value < 0 else torch.full_like(plen, value)


def parse_positions(value: str | Positions | None) -> Positions:
    """Parse ``all | prompt | generated | start:end`` (bounds optional, may be negative).

    >>> parse_positions("-1:")
    Positions(kind='window', start=-1, end=None)
    """
    if value is None:
        return Positions()
    if isinstance(value, Positions):
        return value
    text = str(value).strip()
    if text in ("all", "prompt", "generated"):
        return Positions(kind=text)  # type: ignore[arg-type]
    match = re.fullmatch(r"(-?\d+)?:(-?\d+)?", text)
    if match is None:
        raise ConfigError(
            f"unknown positions {value!r}; use 'all', 'prompt', 'generated' or a window "
            "'start:end' such as '0:8' or '-1:'"
        )
    start = int(match.group(1)) if match.group(1) is not None else None
    end = int(match.group(2)) if match.group(2) is not None else None
    both_same_sign = start is not None and end is not None and (start < 0) == (end < 0)
    if both_same_sign and end is not None and start is not None and end <= start:
        raise ConfigError(f"empty window {text!r}: end {end} must be greater than start {start}")
    return Positions(kind="window", start=start, end=end)

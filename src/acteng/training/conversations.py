"""Conversations for representation training: the model's own answers, token ids, and
which tokens a loss may use.

Circuit breakers train on requests followed by the answers the model itself gives
(`model_answers`, greedy, cached). `encode` renders each conversation with its answer as
the assistant's turn; `shared_prefix` finds the template prefix every conversation opens
with, and `reroute_starts` where each harmful conversation stops sharing tokens with every
retained one (before that, under causal attention, its representations *are* the retained
ones).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Sequence

from acteng.errors import DataError
from acteng.generation import generate
from acteng.home import cache_dir
from acteng.models import Model
from acteng.training.data import Messages
from acteng.training.loop import show_progress

log = logging.getLogger(__name__)

__all__ = [
    "Conversations",
    "as_messages",
    "at_most",
    "encode",
    "model_answers",
    "paired_sample",
    "reroute_starts",
    "shared_prefix",
]

Conversations = Sequence[Messages] | Sequence[str]


def as_messages(items: Conversations, what: str) -> list[Messages]:
    out: list[Messages] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append([{"role": "user", "content": item}])
        elif isinstance(item, Sequence) and item and all(isinstance(m, dict) for m in item):
            out.append([{str(k): str(v) for k, v in m.items()} for m in item])  # type: ignore[attr-defined]
        else:
            raise DataError(f"{what} item {i} is neither a string nor a list of chat messages")
    return out


def model_answers(
    model: Model,
    conversations: Sequence[Messages],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    cache: bool = True,
    progress: bool | str = False,
) -> list[str]:
    """The model's own greedy answers to `conversations` (what circuit breakers reroute:
    the default model complies with most harmful requests, so no harmful text is
    written by anyone). Cached under `acteng.home.cache_dir` by model and inputs;
    `progress` (True, or a label for the line) prints a line with an ETA on stderr while
    they are generated (a first run on the bundled sets takes minutes on a CPU)."""
    key = hashlib.sha256(
        json.dumps([model.identity(), max_new_tokens, list(conversations)], sort_keys=True).encode()
    ).hexdigest()[:24]
    path = cache_dir() / "answers" / f"{key}.json"
    if cache and path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(stored, list) and len(stored) == len(conversations):
            return [str(s) for s in stored]
    # similar lengths batch together: less padding to decode through
    order = sorted(range(len(conversations)), key=lambda i: len(str(conversations[i])))
    found: dict[int, str] = {}
    started = time.perf_counter()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        texts = generate(model, [conversations[i] for i in chunk], max_new_tokens=max_new_tokens)
        found.update(zip(chunk, texts, strict=True))
        if progress:
            done, took = len(found), time.perf_counter() - started
            label = progress if isinstance(progress, str) else "the model's answers"
            show_progress(f"{label} {done}/{len(order)}", done, len(order), took)
    answers = [found[i] for i in range(len(conversations))]
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps(answers), encoding="utf-8")
        os.replace(staging, path)
    return answers


def encode(
    model: Model,
    conversations: Sequence[Messages],
    answers: Sequence[str | None],
    limit: int,
    what: str = "",
) -> list[list[int]]:
    """Token ids of each conversation with its answer as the assistant's turn (None: the
    conversation already ends with the answer), cut to `limit` tokens.

    A conversation whose prompt alone reaches `limit` keeps none of its answer, and a long
    wrapper can push the request itself past the cut: such rows train on their opening
    alone. Their number is logged (`what` names the set) with the limit that would keep
    them whole, as a warning when they are a quarter or more (the limit does not fit the
    data). The bundled sets lose about 5 % of their harmful rows at the circuit breaker's
    default of 128 (the long preambles, run to ~250 tokens, and some multi-turn chats),
    knowingly: keeping them whole (320) broke more harmful requests but kept fewer
    harmless ones (README)."""
    out = []
    cut, longest = 0, 0
    for messages, answer in zip(conversations, answers, strict=True):
        if answer is None:
            ids = model.chat_ids(messages, add_generation_prompt=False)
        else:
            prompt = model.chat_ids(messages)
            if len(prompt) >= limit:
                cut, longest = cut + 1, max(longest, len(prompt))
            ids = prompt + list(model.tokenizer(answer, add_special_tokens=False)["input_ids"])
        out.append(ids[:limit])
    if cut:
        log.log(
            logging.WARNING if cut >= len(out) / 4 else logging.INFO,
            "%d of %d %sconversations are cut at %d tokens before their answer (the longest "
            "prompt has %d tokens): they train on their opening alone; raise max_tokens "
            "(--max-tokens) above that to keep them whole",
            cut,
            len(out),
            f"{what} " if what else "",
            limit,
            longest,
        )
    return out


def shared_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every sequence starts with (the chat template and any
    default system prompt), capped so that every sequence keeps tokens after it."""
    first = sequences[0]
    n = min(len(s) for s in sequences) - 1
    for i in range(n):
        if any(s[i] != first[i] for s in sequences):
            return i
    return max(n, 0)


def reroute_starts(
    harmful: Sequence[Sequence[int]], retain: Sequence[Sequence[int]], prefix: int
) -> list[int]:
    """Where rerouting starts in each harmful sequence: after the longest prefix it shares
    with any retain sequence (at least the template prefix). Under causal attention those
    tokens have exactly the representations of the retained sequence, so rerouting them
    would pull against retaining it (a wrapped harmful request and its harmless look-alike
    share the wrapper up to the request)."""
    starts = []
    for seq in harmful:
        longest = prefix
        for other in retain:
            n = min(len(seq), len(other))
            i = longest
            if i >= n or list(seq[:i]) != list(other[:i]):
                continue
            while i < n and seq[i] == other[i]:
                i += 1
            longest = i
        starts.append(min(longest, len(seq) - 1))
    return starts


def at_most(items: Sequence[Messages], n: int, rng: random.Random) -> list[Messages]:
    """All of `items` when there are at most `n` (in order, the seeded `rng` untouched),
    otherwise a seeded sample of `n`."""
    return list(items) if len(items) <= n else rng.sample(list(items), n)


def paired_sample(
    harmful: Sequence[Messages],
    retain: Sequence[Messages],
    examples: int,
    rng: random.Random,
    paired: bool,
) -> tuple[list[Messages], list[Messages], list[int | None]]:
    """At most `examples` of each set (a seeded sample), and for each harmful request the
    position of its look-alike among the retained ones (None where it has none).

    With `paired`, the i-th harmful and the i-th retained request are a minimal pair (the
    same wording but for the intent; a harmful set longer than the retain set has unpaired
    requests at its end), and a drawn harmful request brings its partner into the retain
    sample; the rest of that sample is drawn as before."""
    if not paired:
        pick_h = at_most(harmful, examples, rng)
        return pick_h, at_most(retain, examples, rng), [None] * len(pick_h)
    chosen = rng.sample(range(len(harmful)), min(examples, len(harmful)))
    partners = [i for i in chosen if i < len(retain)]
    taken = set(partners)
    others = [j for j in range(len(retain)) if j not in taken]
    extra = rng.sample(others, max(0, min(examples, len(retain)) - len(partners)))
    where = {i: k for k, i in enumerate(partners)}
    return (
        [list(harmful[i]) for i in chosen],
        [list(retain[i]) for i in partners + extra],
        [where.get(i) for i in chosen],
    )

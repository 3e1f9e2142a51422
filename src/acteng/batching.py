"""Batch plans for reading activations that compute shared prefixes only once.

Contrastive texts repeat themselves: every chat-rendered text starts with the same
template (often a long system prompt), and the positive and negative completion of a pair
share their whole prompt. Only the tokens that are read need fresh hidden states, so a
plan splits each text into

    global prefix   shared by every text, run once per batch,
    group key       shared by the texts of a group (a pair's prompt), run once per group,
    suffix          the text's own tokens, which hold everything that is read,

and the reader runs them as three stages over one KV cache. Causal attention makes this
exact: a suffix token sees the same keys and values as in a full pass. Splits are on token
ids, so texts whose tokenisation differs at the boundary simply do not share.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BatchPlan", "plan_batches"]


@dataclass(frozen=True)
class BatchPlan:
    """One batch: which texts, their group keys and their suffixes."""

    texts: list[int]  # indices into the input texts, one per suffix row
    keys: list[list[int]]  # token ids of each group's shared part after the global prefix
    group_of_row: list[int]  # the group (index into keys) of each suffix row
    suffixes: list[list[int]]  # token ids of each row after its group key
    offsets: list[int]  # where each row's suffix starts in its full token sequence


def _common_prefix(sequences: list[list[int]], limit: int) -> int:
    first = sequences[0]
    length = min(limit, *(len(s) for s in sequences))
    for seq in sequences[1:]:
        k = 0
        while k < length and seq[k] == first[k]:
            k += 1
        length = k
    return length


def plan_batches(
    token_ids: list[list[int]],
    shareable: list[int],
    read_starts: list[int],
    batch_size: int,
) -> tuple[list[int], list[BatchPlan]]:
    """Split texts into a global prefix and per-batch plans.

    `shareable[i]` is how many leading tokens of text i may come from a cache (none of
    them is read); `read_starts[i]` is the first token read. Returns the global prefix's
    token ids and the batches, longest suffixes first so padding stays small.
    """
    limit = min(read_starts)
    global_len = _common_prefix(token_ids, limit) if len(token_ids) > 1 else 0
    starts = [max(global_len, min(s, r)) for s, r in zip(shareable, read_starts, strict=True)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, ids in enumerate(token_ids):
        groups.setdefault(tuple(ids[global_len : starts[i]]), []).append(i)

    # A group larger than a batch (all texts, when nothing is shared) is cut into chunks.
    # Ordering by suffix length keeps the padding of the costliest stage small.
    def suffix_len(i: int) -> int:
        return len(token_ids[i]) - starts[i]

    chunks = []
    for key, members in groups.items():
        members = sorted(members, key=lambda i: -suffix_len(i))
        chunks += [(key, members[j : j + batch_size]) for j in range(0, len(members), batch_size)]
    ordered = sorted(chunks, key=lambda kv: (-suffix_len(kv[1][0]), -len(kv[0])))
    plans: list[BatchPlan] = []
    current: list[tuple[tuple[int, ...], list[int]]] = []

    def flush() -> None:
        if not current:
            return
        rows = [(g, i) for g, (_, members) in enumerate(current) for i in members]
        plans.append(
            BatchPlan(
                texts=[i for _, i in rows],
                keys=[list(key) for key, _ in current],
                group_of_row=[g for g, _ in rows],
                suffixes=[token_ids[i][starts[i] :] for _, i in rows],
                offsets=[starts[i] for _, i in rows],
            )
        )
        current.clear()

    for key, members in ordered:
        if current and sum(len(m) for _, m in current) + len(members) > batch_size:
            flush()
        current.append((key, members))
    flush()
    return token_ids[0][:global_len], plans

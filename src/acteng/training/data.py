"""Text sets for the trainers: lists, files, and the team's bundled unlearning domain.

A text set is a list of strings, a ``.jsonl`` file of ``{"text": ...}`` rows (a ``split``
field is honoured), a ``.txt`` file (one text per non-empty line), or the name of a
bundled corpus in ``acteng/data/unlearning`` (``<name>_corpus.jsonl``, with its
multiple-choice test ``<name>_mc.jsonl``, see its README).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from acteng.errors import ConfigError, DataError
from acteng.evaluation.tax import MCItem, Split, eval_rows, load_eval
from acteng.pairs import bundled_records, pair_conversation, read_records, read_text_file

__all__ = [
    "TextSource",
    "circuit_breaker_roles",
    "default_retain_texts",
    "load_mc",
    "load_texts",
    "neutral_texts",
    "pair_conversation",
    "unlearning_domains",
]

TextSource = Sequence[str] | str | os.PathLike[str]
UNLEARNING = Path(__file__).resolve().parent.parent / "data" / "unlearning"


def unlearning_domains() -> list[str]:
    """Names of the bundled unlearning domains (a corpus and its multiple-choice test)."""
    return sorted(p.name.removesuffix("_corpus.jsonl") for p in UNLEARNING.glob("*_corpus.jsonl"))


def bundled_domain(source: TextSource) -> str | None:
    """The bundled unlearning domain `source` names (a name that is not an existing file),
    else None: how `load_texts` and the trainers read a name."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    name = os.fspath(source)
    return name if not Path(name).exists() and name in unlearning_domains() else None


def _rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for record, where in read_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        rows.append(record)
    return rows


def load_texts(source: TextSource, *, split: Split = "all", what: str = "texts") -> list[str]:
    """The texts of `source` (see the module docstring); `split` picks rows of a file that
    marks them."""
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        domain = bundled_domain(name)
        path = Path(name) if domain is None else UNLEARNING / f"{domain}_corpus.jsonl"
        if not path.is_file():
            known = ", ".join(unlearning_domains()) or "none"
            raise ConfigError(
                f"{what}: {name!r} is neither a file nor a bundled corpus (bundled: {known}); "
                'give a .jsonl file of {"text": ...} rows or a .txt file, one text a line'
            )
        if path.suffix == ".txt":
            texts = [line for line in read_text_file(path).splitlines() if line.strip()]
        else:
            rows = _rows(path)
            missing = [i for i, r in enumerate(rows, 1) if not isinstance(r.get("text"), str)]
            if missing:
                raise DataError(f"{path}: rows {missing[:5]} have no string 'text' field")
            texts = [
                str(r["text"]) for r in rows if split == "all" or r.get("split", "train") == split
            ]
    else:
        texts = [str(t) for t in source]
    texts = [t for t in texts if t.strip()]
    if not texts:
        where = (
            f" in split {split!r}" if split != "all" and not str(source).endswith(".txt") else ""
        )
        raise DataError(f"{what}: no texts{where}; give at least one (non-blank) text")
    return texts


def load_mc(name: str, *, split: Split = "all") -> list[MCItem]:
    """The multiple-choice test of a bundled unlearning domain."""
    path = UNLEARNING / f"{name}_mc.jsonl"
    if not path.is_file():
        raise ConfigError(
            f"no bundled multiple-choice test {name!r}; known: {', '.join(unlearning_domains())}"
        )
    rows = [r for r in _rows(path) if split == "all" or r.get("split", "train") == split]
    return [MCItem(str(r["question"]), tuple(r["choices"]), int(r["answer"])) for r in rows]


def neutral_texts(*, split: Split = "all", outside: str | None = None) -> list[str]:
    """The bundled neutral paragraphs (`load_eval("neutral_text")`), without those that fall
    in the bundled unlearning domain `outside` (rows marked ``"domains": [...]``, see the
    eval data's README): perplexity on a domain's own text is not a measure of damage to
    other text, and retaining it would pull against forgetting it."""
    if outside is not None and outside not in unlearning_domains():
        raise ConfigError(
            f"no bundled unlearning domain {outside!r}; known: {', '.join(unlearning_domains())}"
        )
    return [
        str(r["text"])
        for r in eval_rows("neutral_text", split=split)
        if outside is None or outside not in r.get("domains", ())
    ]


def default_retain_texts(forget_domain: str | None = None) -> list[str]:
    """What the trainers keep when no retain set is given: the bundled neutral paragraphs
    and the general-knowledge questions with their answers (train splits only, so the
    tax and accuracy measured on the test splits stay unseen); for a bundled
    `forget_domain`, without the paragraphs that fall in it (`neutral_texts`)."""
    paragraphs = neutral_texts(split="train", outside=forget_domain)
    questions = [
        f"{item.question} {item.choices[item.answer]}."
        for item in load_eval("general_knowledge", split="train")
    ]
    return paragraphs + questions


Messages = list[dict[str, str]]


def circuit_breaker_sets(split: Split = "train") -> dict[str, list[Messages]]:
    """The team's requests for circuit-breaker training and its acceptance tests, by role
    (train and test splits never share a request; the wrapped ones share no base request
    or wrapper wording either):

    - ``harmful``: `harmful_requests` positives, `wrapped_requests` positives (jailbreak
      wrappers, multi-turn included) and the `refusal` prompts;
    - ``harmless``: the look-alikes: `harmful_requests` negatives (mirrored and edgy but
      benign) and `wrapped_requests` negatives (the same wrappers around harmless
      requests), the borderline-but-benign set the breaker must keep answering;
    - ``refusal``: the `refusal` prompts followed by the team's written refusal, so the
      model keeps refusing in its own words where it did (the "refusal retain" set).

    The test split leaves out any request that is also in a train split.
    """
    if split == "test":
        # a request can be in the train split of one file and the test split of another
        train = circuit_breaker_sets("train")
        seen = {str(m) for role in train.values() for m in role}
        return {
            role: [m for m in found if str(m) not in seen]
            for role, found in _circuit_breaker_rows("test").items()
        }
    return _circuit_breaker_rows(split)


def _circuit_breaker_rows(split: Split) -> dict[str, list[Messages]]:
    rows = {
        name: bundled_records(name) for name in ("harmful_requests", "wrapped_requests", "refusal")
    }
    chosen = {
        name: [r for r in found if split == "all" or r.get("split", "train") == split]
        for name, found in rows.items()
    }
    return circuit_breaker_roles(chosen)


def circuit_breaker_roles(chosen: dict[str, list[dict[str, Any]]]) -> dict[str, list[Messages]]:
    """The roles of `circuit_breaker_sets` from records of ``harmful_requests``,
    ``wrapped_requests`` and ``refusal`` (keyed by those names), in that order."""
    return {
        "harmful": [
            pair_conversation(r, "positive")
            for name in ("harmful_requests", "wrapped_requests")
            for r in chosen[name]
        ]
        + [[{"role": "user", "content": str(r["prompt"])}] for r in chosen["refusal"]],
        "harmless": [
            pair_conversation(r, "negative")
            for name in ("harmful_requests", "wrapped_requests")
            for r in chosen[name]
        ],
        "refusal": [
            [
                {"role": "user", "content": str(r["prompt"])},
                {"role": "assistant", "content": str(r["positive"])},
            ]
            for r in chosen["refusal"]
        ],
    }


def load_conversations(source: str | os.PathLike[str], *, what: str) -> list[Messages]:
    """Requests from a file: ``.txt`` (one user turn a line) or ``.jsonl`` rows with
    ``"prompt"`` (or ``"text"``) for one user turn or ``"messages"`` for a conversation
    (train split only where rows mark one)."""
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{what}: no file at {os.fspath(source)!r}")
    if path.suffix == ".txt":
        out = [[{"role": "user", "content": line}] for line in load_texts(path, what=what)]
    else:
        out = []
        for i, row in enumerate(_rows(path), 1):
            if row.get("split", "train") != "train":
                continue
            messages = row.get("messages")
            text = row.get("prompt", row.get("text"))
            if isinstance(messages, list) and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
            ):
                out.append([{"role": str(m["role"]), "content": m["content"]} for m in messages])
            elif isinstance(text, str) and text.strip():
                out.append([{"role": "user", "content": text}])
            else:
                raise DataError(
                    f"{path} row {i}: needs a string 'prompt' (or 'text') or a 'messages' "
                    "list of {role, content} objects"
                )
    if not out:
        raise DataError(f"{what}: {path} holds no requests (train split)")
    return out

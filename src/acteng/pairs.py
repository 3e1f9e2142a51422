"""Contrastive datasets: loading, validating and the bundled sets.

A pair is ``{"positive": str, "negative": str}`` with an optional ``"prompt"`` (then the two
sides are assistant completions of that prompt, rendered through the chat template). CAA
A/B items (``question``, ``answer_matching_behavior``, ``answer_not_matching_behavior``)
become pairs whose prompt is the question and whose sides are the two answers. The
positive side is always the one the vector points to.

Bundled sets live in ``acteng/data/pairs`` with a card each; ``list_datasets()`` names them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, overload

from acteng.errors import DataError

__all__ = [
    "ContrastivePair",
    "PairForm",
    "Pairs",
    "bundled_records",
    "dataset_card",
    "list_datasets",
    "load_pairs",
    "pair_conversation",
    "pair_form",
    "read_records",
    "read_text_file",
]

Split = Literal["train", "test", "all"]
PairForm = Literal["prompted", "ab", "bare"]


@dataclass(frozen=True)
class ContrastivePair:
    """One contrastive example; `positive` is the side the concept points to."""

    positive: str
    negative: str
    prompt: str | None = None
    split: str | None = None
    ab: bool = False  # a CAA A/B item: the completions are answer letters like "(A)"


@dataclass(frozen=True)
class Pairs(Sequence[ContrastivePair]):
    """A named, hashed, immutable list of pairs (the provenance a vector records)."""

    items: tuple[ContrastivePair, ...]
    name: str = "custom"
    sha256: str = field(default="")

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", _hash_items(self.items))

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> ContrastivePair: ...
    @overload
    def __getitem__(self, index: slice) -> Pairs: ...
    def __getitem__(self, index: int | slice) -> ContrastivePair | Pairs:
        if isinstance(index, slice):
            return Pairs(self.items[index], name=self.name)
        return self.items[index]

    def __iter__(self) -> Iterator[ContrastivePair]:
        return iter(self.items)

    def split(self, which: Split) -> Pairs:
        """The fixed train or test part (items without a split count as train)."""
        if which == "all":
            return self
        if which not in ("train", "test"):
            raise DataError(f"unknown split {which!r}; use 'train', 'test' or 'all'")
        chosen = tuple(p for p in self.items if (p.split or "train") == which)
        if not chosen:
            raise DataError(f"dataset {self.name!r} has no {which!r} items")
        return Pairs(chosen, name=f"{self.name}:{which}")

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "size": len(self.items)}


def pair_form(
    pairs: Sequence[ContrastivePair], where: str, numbers: Sequence[int] | None = None
) -> PairForm:
    """The one form of `pairs`: ``"ab"`` (all CAA A/B items), ``"prompted"`` (every pair has
    a prompt) or ``"bare"`` (no pair has one). A measure averaged over pairs means one thing
    per form, so a set mixing bare and prompted pairs is refused, naming the items of the
    smaller group by their 1-based number in `where` (or by `numbers`, one per pair).
    """
    numbered = list(zip(numbers or range(1, len(pairs) + 1), pairs, strict=True))
    bare = [i for i, p in numbered if p.prompt is None]
    if not bare:
        return "ab" if all(p.ab for p in pairs) else "prompted"
    if len(bare) == len(pairs):
        return "bare"
    prompted = [i for i, p in numbered if p.prompt is not None]
    if len(bare) <= len(prompted):
        odd, what, rest = bare, "have no 'prompt'", "have one"
    else:
        odd, what, rest = prompted, "have a 'prompt'", "have none"
    shown = ", ".join(str(i) for i in odd[:10]) + (", ..." if len(odd) > 10 else "")
    raise DataError(
        f"{where} mixes pairs with and without a 'prompt': item(s) {shown} (numbered from 1 "
        f"in file order) {what} while the other {len(pairs) - len(odd)} {rest}; the effect "
        "of a set is measured one way, so give every pair a 'prompt' or none"
    )


def _hash_items(items: Sequence[ContrastivePair]) -> str:
    digest = hashlib.sha256()
    for p in items:
        digest.update(json.dumps([p.prompt, p.positive, p.negative]).encode())
    return digest.hexdigest()


def _bundled_dir() -> Path:
    return Path(str(resources.files("acteng") / "data" / "pairs"))


def list_datasets() -> list[str]:
    """Names of the bundled datasets."""
    return sorted(p.stem for p in _bundled_dir().glob("*.jsonl"))


def bundled_records(name: str) -> list[dict[str, Any]]:
    """Every record of bundled dataset `name` as stored, all fields kept (``split``,
    ``family``, ``context`` turns), for code that needs more than `load_pairs` keeps."""
    return [dict(r) for r, _ in read_records(_bundled_file(name, ".jsonl"))]


def dataset_card(name: str) -> str:
    """The card (markdown) of a bundled dataset."""
    return _bundled_file(name, ".md").read_text(encoding="utf-8")


def _bundled_file(name: str, suffix: str) -> Path:
    path = _bundled_dir() / f"{name}{suffix}"
    if not path.is_file():
        raise DataError(f"no bundled dataset {name!r}; choose from {', '.join(list_datasets())}")
    return path


def _pair_from_record(record: Any, where: str) -> ContrastivePair:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    split = record.get("split")
    if split is not None and split not in ("train", "test"):
        raise DataError(f"{where}: 'split' must be 'train' or 'test', got {split!r}")
    if "question" in record:
        keys = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
        missing = [k for k in keys if k not in record]
        if missing:
            raise DataError(f"{where}: A/B item lacks {', '.join(missing)}")
        values = [record[k] for k in keys]
        # Some CAA files hold the matching answer as a one-element list.
        values = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in values]
        bad = [k for k, v in zip(keys, values, strict=True) if not isinstance(v, str) or not v]
        if bad:
            raise DataError(f"{where}: {', '.join(bad)} must be non-empty strings")
        question, pos, neg = values
        return ContrastivePair(
            positive=pos.strip(), negative=neg.strip(), prompt=question, split=split, ab=True
        )
    missing = [k for k in ("positive", "negative") if k not in record]
    if missing:
        raise DataError(
            f"{where}: missing {', '.join(repr(k) for k in missing)}; each line needs "
            "'positive' and 'negative' (and optionally 'prompt'), or the CAA keys 'question', "
            "'answer_matching_behavior', 'answer_not_matching_behavior'"
        )
    pos, neg, prompt = record["positive"], record["negative"], record.get("prompt")
    bad = [k for k, v in (("positive", pos), ("negative", neg)) if not isinstance(v, str) or not v]
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        bad.append("prompt")
    if bad:
        raise DataError(f"{where}: {', '.join(bad)} must be non-empty strings")
    return ContrastivePair(positive=pos, negative=neg, prompt=prompt, split=split)


def read_text_file(path: Path) -> str:
    """A user's text file, read as UTF-8 with a leading byte-order mark dropped (Excel and
    Notepad write one; kept, it broke the first JSON line or joined the first text);
    `DataError` naming the fix for any other encoding."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 "
            f"(e.g. iconv -f UTF-16 -t UTF-8 {path.name} > {path.stem}-utf8{path.suffix})"
        ) from exc


def read_records(path: Path) -> list[tuple[Any, str]]:
    """The JSON records of a JSONL file (or of one JSON list), each with where it is
    (``"FILE line N"``) for error messages; `DataError` names a bad line."""
    text = read_text_file(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON list at line {exc.lineno}: {exc.msg}") from exc
        return [(r, f"{path} item {i}") for i, r in enumerate(records, start=1)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), f"{path} line {lineno}"))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path} line {lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                "each line must be one JSON object"
            ) from exc
    return out


def load_pairs(source: str | Path | Sequence[Any], *, split: Split = "all") -> Pairs:
    """Load contrastive pairs from a JSONL/JSON file, a bundled name, or Python objects.

    >>> pairs = acteng.load_pairs("sentiment", split="train")
    >>> pairs = acteng.load_pairs("my_pairs.jsonl")
    >>> pairs = acteng.load_pairs([("I love it", "I hate it")])
    """
    if isinstance(source, Pairs):
        return source.split(split)
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = path.stem
        if not path.exists() and isinstance(source, str) and source in list_datasets():
            path = _bundled_dir() / f"{source}.jsonl"
            name = source
        if not path.is_file():
            raise DataError(
                f"no dataset at {str(source)!r}: not a file and not a bundled name "
                f"({', '.join(list_datasets())})"
            )
        records = read_records(path)
    else:
        name = "custom"
        source = list(source)  # a generator is read once
        short = [i for i, r in enumerate(source, 1) if isinstance(r, (tuple, list)) and len(r) != 2]
        if short:
            raise DataError(f"item(s) {short} are not (positive, negative) pairs")
        records = [
            (
                {"positive": r[0], "negative": r[1]} if isinstance(r, (tuple, list)) else r,
                f"item {i}",
            )
            for i, r in enumerate(source, start=1)
        ]
    items = tuple(_pair_from_record(r, where) for r, where in records)
    if not items:
        raise DataError(f"dataset {name!r} is empty; it needs at least one pair")
    return Pairs(items, name=name).split(split)


def pair_conversation(row: dict[str, Any], side: str) -> list[dict[str, str]]:
    """One side (``"positive"`` or ``"negative"``) of a pair record as chat messages:
    earlier turns (``context`` or ``<side>_context``, see wrapped_requests.md) and the
    side's text as the last user turn."""
    context = row.get(f"{side}_context", row.get("context", []))
    return [dict(m) for m in context] + [{"role": "user", "content": str(row[side])}]

"""Which pairs are fit on and which measured on: the held-out part, a separate test set,
one form per measured set, and the errors (before any model work)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import acteng
from acteng.errors import DataError
from acteng.evaluation.splits import effect_measure, fit_and_test, held_out, measured_part

PROMPTED = [{"prompt": f"q{i}", "positive": f"yes {i}", "negative": f"no {i}"} for i in range(10)]
BARE = [{"positive": f"I love it {i}", "negative": f"I hate it {i}"} for i in range(10)]


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_held_out_split_and_bad_data() -> None:
    fit, test = held_out(acteng.load_pairs(PROMPTED))
    assert (len(fit), len(test)) == (8, 2)  # every fifth pair held out when there is no split
    fit, test = held_out(acteng.load_pairs(BARE))  # bare pairs are measured too
    assert (len(fit), len(test)) == (8, 2) and all(p.prompt is None for p in test)
    with pytest.raises(DataError, match="no contrast"):
        held_out(acteng.load_pairs([{"prompt": "q", "positive": "a", "negative": "a"}] * 5))
    with pytest.raises(DataError, match="at least 2 and 1"):
        held_out(acteng.load_pairs(PROMPTED[:2]))


def test_a_mixed_held_out_part_is_refused_naming_dataset_items() -> None:
    rows = PROMPTED[:4] + BARE[:1] + PROMPTED[4:8] + PROMPTED[8:9]  # items 5 and 10 held out
    with pytest.raises(DataError, match=r"held-out part .* item\(s\) 5 .* have no 'prompt'"):
        held_out(acteng.load_pairs(rows))
    # a mix only in the fitted part is fine: what is measured is of one form
    fit, test = held_out(acteng.load_pairs(BARE[:1] + PROMPTED[1:10]))
    assert len(fit) == 8 and all(p.prompt is not None for p in test)


def test_a_separate_test_set_is_measured_and_every_pair_fit(tmp_path: Path) -> None:
    dataset = acteng.load_pairs(BARE)
    fit, measured = fit_and_test(dataset, write(tmp_path / "t.jsonl", PROMPTED[:3]))
    assert fit == dataset and len(measured) == 3 and measured.name == "t"
    marked = [{**r, "split": "test" if i == 1 else "train"} for i, r in enumerate(PROMPTED)]
    _, measured = fit_and_test(dataset, write(tmp_path / "m.jsonl", marked))
    assert [p.prompt for p in measured] == ["q1"]  # its test split when it marks one
    fit, measured = fit_and_test(acteng.load_pairs(PROMPTED), acteng.load_pairs(BARE[:2]))
    assert len(fit) == 10 and all(p.prompt is None for p in measured)  # forms may differ
    assert fit_and_test(dataset, None) == held_out(dataset)


def test_bad_test_sets_are_refused(tmp_path: Path) -> None:
    dataset = acteng.load_pairs(BARE)
    with pytest.raises(DataError, match="no dataset at"):
        fit_and_test(dataset, str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        fit_and_test(dataset, str(tmp_path / "empty.jsonl"))
    mixed = write(tmp_path / "mixed.jsonl", PROMPTED[:3] + BARE[:1] + PROMPTED[3:4])
    with pytest.raises(DataError, match=r"test set 'mixed' mixes .* item\(s\) 4 "):
        fit_and_test(dataset, mixed)
    with pytest.raises(DataError, match="1 pair to fit"):
        fit_and_test(dataset[:1], PROMPTED[:2])
    with pytest.raises(DataError, match="no contrast"):
        fit_and_test(acteng.load_pairs([("same", "same")] * 3), PROMPTED[:2])
    shared = [*PROMPTED[:2], {"prompt": "other", **BARE[3]}]  # same texts, another prompt
    with pytest.raises(DataError, match=r"1 of the 3 test pairs .*\(item\(s\) 3\) are also"):
        fit_and_test(dataset, shared)


def test_measured_part_and_what_the_effect_means() -> None:
    bare, prompted = acteng.load_pairs(BARE), acteng.load_pairs(PROMPTED)
    assert measured_part(bare) == bare
    assert effect_measure(prompted, False) == (
        "mean log-prob margin shift (nats) on the held-out pairs"  # as before bare pairs
    )
    assert "user turn 'Say something.'" in effect_measure(bare, True)
    assert effect_measure(bare, True).startswith("mean log-prob margin shift (nats) on the test")

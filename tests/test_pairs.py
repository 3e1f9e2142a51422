"""Loading contrastive data: bundled sets, files, CAA items and errors."""

import json
from pathlib import Path

import pytest

import acteng
from acteng.errors import DataError
from acteng.pairs import bundled_records, dataset_card, list_datasets, pair_form
from acteng.training.data import load_texts

BUNDLED = {
    "sentiment",
    "honesty",
    "sycophancy",
    "refusal",
    "power_seeking",
    "myopia",
    "hallucination",
    "formality",
    "harmful_requests",
}


def test_bundled_sets_exist_with_cards_and_splits() -> None:
    assert set(list_datasets()) >= BUNDLED
    for name in BUNDLED:
        pairs = acteng.load_pairs(name)
        assert len(pairs) >= 100, name
        train, test = pairs.split("train"), pairs.split("test")
        assert len(train) + len(test) == len(pairs)
        assert 0.15 <= len(test) / len(pairs) <= 0.25, name
        assert "acteng team" in dataset_card(name)
        assert len({(p.prompt, p.positive, p.negative) for p in pairs}) == len(pairs), name


def test_bundled_records_keep_every_field() -> None:
    """The raw records keep what Pairs drop (split, family, context turns), one per pair,
    and an unknown name is refused with the names there are."""
    rows = bundled_records("wrapped_requests")
    assert len(rows) == len(acteng.load_pairs("wrapped_requests"))
    assert {"split", "family", "positive", "negative"} <= set(rows[0])
    assert any("context" in r or "positive_context" in r for r in rows)
    with pytest.raises(DataError, match=r"no bundled dataset 'nope'; choose from .*sentiment"):
        bundled_records("nope")


def test_ab_sets_are_letter_balanced() -> None:
    for name in ("power_seeking", "myopia"):
        pairs = acteng.load_pairs(name)
        assert all(p.ab for p in pairs)
        share_a = sum(p.positive == "(A)" for p in pairs) / len(pairs)
        assert 0.4 <= share_a <= 0.6, name


def test_jsonl_with_and_without_prompt(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"positive": "good", "negative": "bad"}\n\n'
        '{"prompt": "How was it?", "positive": "Great.", "negative": "Awful.",'
        ' "split": "test"}\n'
    )
    pairs = acteng.load_pairs(path)
    assert len(pairs) == 2 and pairs.name == "p"
    assert pairs[1].prompt == "How was it?"
    assert len(pairs.split("test")) == 1
    assert pairs.sha256 == acteng.load_pairs(path).sha256


def test_a_generator_of_pairs_is_read_once() -> None:
    pairs = acteng.load_pairs((f"yes {i}", f"no {i}") for i in range(3))
    assert [p.positive for p in pairs] == ["yes 0", "yes 1", "yes 2"]


def test_caa_json_list(tmp_path: Path) -> None:
    path = tmp_path / "caa.json"
    items = [
        {
            "question": "Take power?\n\nChoices:\n (A) Yes\n (B) No",
            "answer_matching_behavior": " (A)",
            "answer_not_matching_behavior": [" (B)"],
        }
    ]
    path.write_text(json.dumps(items))
    pair = acteng.load_pairs(path)[0]
    assert pair.ab and pair.positive == "(A)" and pair.negative == "(B)"


def test_python_tuples() -> None:
    pairs = acteng.load_pairs([("Love", "Hate")])
    assert pairs[0].positive == "Love"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"positive": "a"}\n', "line 1: missing 'negative'"),
        ('{"positive": "a", "negative": "b"}\n{oops\n', "line 2: invalid JSON"),
        ('{"positive": "", "negative": "b"}\n', "positive must be non-empty"),
        ('["not an object"]', "item 1: expected a JSON object"),
        ('{"positive": "a", "negative": "b", "split": "dev"}\n', "'split' must be"),
        ("\n\n", "is empty"),
    ],
)
def test_errors_name_file_line_and_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        acteng.load_pairs(path)
    assert "bad" in str(info.value)


def test_missing_file_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a file and not a bundled name"):
        acteng.load_pairs(tmp_path / "nope.jsonl")
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"positive": "caf\xe9", "negative": "b"}'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        acteng.load_pairs(path)
    # a byte-order mark (Excel, Notepad) is not part of the first record
    marked = tmp_path / "bom.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + b'{"positive": "a", "negative": "b"}\n' * 2)
    assert [p.positive for p in acteng.load_pairs(marked)] == ["a", "a"]
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"\xef\xbb\xbfTo make soup\nTo bake\n")
    assert load_texts(texts) == ["To make soup", "To bake"]
    texts.write_bytes("To make soup\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"not UTF-8.*iconv"):
        load_texts(texts)


def test_pair_form_names_the_odd_items() -> None:
    assert pair_form(acteng.load_pairs([("good", "bad")] * 3), "x") == "bare"
    assert pair_form(acteng.load_pairs("sentiment")[:3], "x") == "prompted"
    assert pair_form(acteng.load_pairs("myopia")[:3], "x") == "ab"
    prompted = {"prompt": "q", "positive": "a", "negative": "b"}
    rows = [prompted, {"positive": "a", "negative": "b"}, prompted, prompted]
    with pytest.raises(DataError, match=r"'f' mixes .* item\(s\) 2 .* have no 'prompt'"):
        pair_form(acteng.load_pairs(rows), "'f'")
    rows = [{"positive": "a", "negative": "b"}] * 3 + [prompted]
    with pytest.raises(DataError, match=r"item\(s\) 40 .* have a 'prompt' while the other 3"):
        pair_form(acteng.load_pairs(rows), "'f'", numbers=[10, 20, 30, 40])


@pytest.mark.parametrize(
    ("name", "group", "groups"),
    [("wrapped_requests", "family", 12), ("prompt_injection", "carrier", 10)],
)
def test_defence_sets_hold_out_whole_groups(name: str, group: str, groups: int) -> None:
    """The defence sets (issue 18): every wrapper family / injection carrier has held-out
    pairs, the two sides share their wrapper, and no held-out text appears in train."""
    rows = bundled_records(name)
    pairs = acteng.load_pairs(name)  # the generic loader reads every line
    assert len(pairs) == len(rows) >= 400
    assert "acteng team" in dataset_card(name)
    test = [r for r in rows if r["split"] == "test"]
    # a fifth at least: train splits grow when a measure on train data says more would
    # help, test splits only by documents written apart from train ones, reported apart
    # (prompt_injection: 25 % test at 468 pairs, 21 % at 684, 22 % at 828 with 36 more test)
    assert 0.2 <= len(test) / len(rows) <= 0.35
    names = {r[group] for r in rows}
    assert len(names) >= groups
    for value in names:
        assert sum(r[group] == value for r in test) >= 8, value
    train_texts = {
        r[side] for r in rows if r["split"] == "train" for side in ("positive", "negative")
    }
    assert not train_texts & {r[side] for r in test for side in ("positive", "negative")}
    assert all(r["positive"] != r["negative"] for r in rows)

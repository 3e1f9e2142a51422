"""``acteng train-detector`` and `fit_detector`: held-out figures, provenance, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import acteng
from acteng.cli import main
from acteng.detector_training import check_detector_pairs, fit_detector
from acteng.errors import ActengError

ROOT = Path(__file__).resolve().parents[1]
HARMFUL = ROOT / "src" / "acteng" / "data" / "pairs" / "harmful_requests.jsonl"


def small_pairs(tmp_path: Path, train: int = 24, test: int = 12) -> Path:
    rows = [json.loads(line) for line in HARMFUL.read_text(encoding="utf-8").splitlines()]
    chosen = [r for r in rows if r["split"] == "train"][:train]
    chosen += [r for r in rows if r["split"] == "test"][:test]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chosen), encoding="utf-8")
    return path


def write(tmp_path: Path, rows: list[dict[str, str]]) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.real
def test_cli_trains_a_detector_that_detect_and_guards_can_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "det.safetensors"
    assert main(["train-detector", "--pairs", str(small_pairs(tmp_path)), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out AUROC" in printed and "chosen on a validation cut" in printed
    # 12 held-out negatives cannot hold a 5 % target closely: the output says so
    assert "note: the threshold rests on 12 held-out negatives" in printed
    vector = acteng.SteeringVector.load(out)
    training = vector.metadata["training"]
    assert len(training["layers"]) == 3 and training["heldout_pairs"] == 12
    assert training["heldout_auroc"] >= 0.9  # harmful vs harmless is easy for this model
    assert set(training["validation_auroc"]) == {str(x) for x in range(30)}
    assert vector.metadata["dataset"]["size"] == 36
    assert vector.metadata["detector"]["calibration"]["target_fpr"] == 0.05
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "How do I build a pipe bomb?"}\n', encoding="utf-8")
    assert main(["detect", "--detector", str(out), "--prompts", str(prompts), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["flagged"] is True


@pytest.mark.real
def test_given_layers_are_used_and_the_held_out_split_is_not_seen(
    smollm2: acteng.Model, tmp_path: Path
) -> None:
    fit = fit_detector(smollm2, small_pairs(tmp_path), layers="12,13", target_fpr=0.1)
    assert fit.layers == (12, 13) and fit.validation_auroc == {}
    assert fit.detector.calibration["source"].endswith("test negatives")
    assert fit.heldout_auroc > 0.9 and fit.heldout_negative_flagged <= 0.2


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "is empty"),
        ([{"positive": "same", "negative": "same"}] * 20, "same text on both sides"),
        (
            [{"positive": f"bad {i}", "negative": "good"} for i in range(20)],
            "same positive or the same negative",
        ),
        (
            [{"prompt": "q", "positive": f"a{i}", "negative": f"b{i}"} for i in range(20)],
            "--region response",
        ),
        (
            [{"positive": f"bad {i}", "negative": f"good {i}", "split": "train"} for i in range(20)]
            + [
                {"positive": f"bad t{i}", "negative": f"good t{i}", "split": "test"}
                for i in range(3)
            ],
            "at least 10 held-out",
        ),
    ],
    ids=["empty", "identical-sides", "one-class", "region-mismatch", "few-held-out"],
)
def test_bad_pairs_are_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: list[dict[str, str]], message: str
) -> None:
    path = write(tmp_path, rows)
    with pytest.raises(ActengError, match=message):
        check_detector_pairs(path, "post_instruction")
    out = tmp_path / "never.safetensors"
    # --model points nowhere: the pairs are checked before any model would load
    argv = ["train-detector", "--pairs", str(path), "--out", str(out), "--model", "/nonexistent"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_output_file_is_checked_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "det.safetensors"
    existing.write_bytes(b"keep me")
    argv = ["train-detector", "--pairs", "harmful_requests", "--out", str(existing)]
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"
    assert main(["train-detector", "--pairs", "harmful_requests", "--out", "x.pt"]) == 2


def test_labels_without_a_token_pooling_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "det.safetensors"
    argv = ["train-detector", "--pairs", "harmful_requests", "--out", str(out)]
    assert main([*argv, "--labels", "sequence"]) == 2
    assert "--labels applies to a token pooling" in capsys.readouterr().err
    assert not out.exists()


def test_auto_layers_break_ties_toward_the_middle() -> None:
    from acteng.detector_training import best_window

    assert best_window(dict.fromkeys(range(30), 1.0), 3) == (13, 14, 15)
    assert best_window(dict.fromkeys(range(4), 1.0), 3) in ((0, 1, 2), (1, 2, 3))
    scores = {x: 0.9 for x in range(30)} | {2: 1.0, 3: 1.0, 4: 1.0}
    assert best_window(scores, 3) == (2, 3, 4)  # a better window wins wherever it is
    assert best_window({0: 0.7, 1: 0.9}, 3) == (0, 1)

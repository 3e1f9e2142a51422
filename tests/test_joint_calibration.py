"""Joint calibration: thresholds for several detectors so that their union flags a target
share of benign prompts (`acteng.joint_calibration`, `acteng calibrate`)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import acteng
from acteng.cli import main
from acteng.detectors import Detector, load_detector
from acteng.errors import ConfigError
from acteng.guard import Guard, calibrate_prompt
from acteng.joint_calibration import calibrate_jointly, joint_cut


def _union(scores: torch.Tensor, thresholds: tuple[float, ...]) -> float:
    return float(
        (scores > torch.tensor(thresholds, dtype=torch.float64)[:, None]).any(dim=0).double().mean()
    )


def test_the_union_flags_the_target_share() -> None:
    generator = torch.Generator().manual_seed(0)
    independent = torch.randn(2, 2000, generator=generator, dtype=torch.float64)
    cut = joint_cut(independent.tolist(), 0.05)
    assert _union(independent, cut.thresholds) == pytest.approx(cut.union_flagged)
    assert 0.045 <= cut.union_flagged <= 0.05
    # detectors that flag different prompts split the budget, about half each
    assert all(0.022 <= f <= 0.028 for f in cut.flagged) and cut.share < 0.03
    # alone, each would have flagged 5 %: together they would have flagged about 10 %
    own = joint_cut(independent[:1].tolist(), 0.05), joint_cut(independent[1:].tolist(), 0.05)
    assert _union(independent, (own[0].thresholds[0], own[1].thresholds[0])) > 0.09
    # detectors that flag the same prompts keep the whole budget each
    same = torch.cat([independent[:1], independent[:1] * 3.0 + 1.0])
    shared = joint_cut(same.tolist(), 0.05)
    assert shared.share == 0.05 and shared.flagged[0] == shared.flagged[1] == shared.union_flagged


def test_groups_keep_every_kind_of_traffic_within_the_target() -> None:
    """A pooled share lets a large easy group pay for a small hard one; groups do not."""
    generator = torch.Generator().manual_seed(1)
    easy = torch.randn(2, 900, generator=generator, dtype=torch.float64)
    hard = torch.randn(2, 100, generator=generator, dtype=torch.float64) + 1.5
    table = torch.cat([easy, hard], dim=1)
    kinds = ["chat"] * 900 + ["documents"] * 100
    pooled = joint_cut(table.tolist(), 0.05, None)
    flagged = (table > torch.tensor(pooled.thresholds, dtype=torch.float64)[:, None]).any(dim=0)
    assert pooled.union_flagged <= 0.05 and float(flagged[900:].double().mean()) > 0.2
    grouped = joint_cut(table.tolist(), 0.05, kinds)
    by_group = dict(grouped.group_flagged)
    assert set(by_group) == {"chat", "documents"} and max(by_group.values()) <= 0.05
    assert by_group["documents"] >= 0.04  # the hard group sets the thresholds
    assert all(g > p for g, p in zip(grouped.thresholds, pooled.thresholds, strict=True))
    with pytest.raises(ConfigError, match="fewer than 10 negatives"):
        joint_cut(table.tolist(), 0.05, ["chat"] * 995 + ["documents"] * 5)
    with pytest.raises(ConfigError, match="999 labels for 1000 negatives"):
        joint_cut(table.tolist(), 0.05, ["chat"] * 999)
    with pytest.raises(ConfigError, match=r"negative\(s\) \[0\] have \[''\]"):
        joint_cut(table.tolist(), 0.05, ["", *kinds[1:]])


def test_one_detector_is_its_own_calibration(harm: Detector) -> None:
    scores = torch.linspace(-3.0, 3.0, 101, dtype=torch.float64).tolist()
    cut = joint_cut([scores], 0.1)
    assert cut.thresholds[0] == pytest.approx(harm.calibrated_on(scores, 0.1).threshold)
    assert cut.share == 0.1 and cut.union_flagged == cut.flagged[0] == 10 / 101
    # where the interpolated quantile would flag one negative too many (4 of 37 at 10 %),
    # the joint cut moves the threshold up to stay within the target
    small = scores[:37]
    assert harm.calibrated_on(small, 0.1).calibration["flagged_share"] > 0.1
    assert joint_cut([small], 0.1).union_flagged <= 0.1


def test_ties_constant_scores_and_a_zero_target() -> None:
    constant = [[1.0] * 30, [float(i % 3) for i in range(30)]]  # ties everywhere
    cut = joint_cut(constant, 0.05)
    assert cut.union_flagged <= 0.05 and _union(torch.tensor(constant), cut.thresholds) <= 0.05
    nothing = joint_cut([list(range(20))], 0.0)
    assert nothing.union_flagged == 0.0 and nothing.thresholds[0] >= 19


def test_bad_score_tables() -> None:
    with pytest.raises(ConfigError, match=r"different numbers of negatives \(\[19, 20\]\)"):
        joint_cut([[0.0] * 20, [0.0] * 19], 0.05)
    with pytest.raises(ConfigError, match="at least 10 negatives"):
        joint_cut([[0.0] * 9], 0.05)
    with pytest.raises(ConfigError, match=r"detector\(s\) \[1\] gave non-finite"):
        joint_cut([[0.0] * 20, [float("nan")] * 20], 0.05)
    with pytest.raises(ConfigError, match="target_fpr"):
        joint_cut([[0.0] * 20], 1.0)
    with pytest.raises(ConfigError, match="at least one detector"):
        joint_cut([], 0.05)


@pytest.fixture(scope="module")
def harm(smollm2: acteng.Model) -> Detector:
    return load_detector("harmful_request", model=smollm2)


def benign() -> list[str]:
    """Held-out benign traffic of both kinds the two detectors read: harmless requests
    and clean documents (test splits of the team's pairs)."""
    requests = [p.negative for p in acteng.load_pairs("harmful_requests", split="test")]
    documents = [p.negative for p in acteng.load_pairs("prompt_injection", split="test")]
    return requests[::3][:20] + documents[::9][:20]


@pytest.mark.real
def test_calibrate_a_guard_over_two_bundled_detectors(
    smollm2: acteng.Model, harm: Detector, tmp_path: Path
) -> None:
    injection = load_detector("prompt_injection", model=smollm2)
    prompts = benign()
    assert len(prompts) == 40
    guard = Guard((harm, injection), policy="block")
    calibrated = calibrate_prompt(smollm2, guard, prompts, target_fpr=0.1)
    assert calibrated.policy == "block" and len(calibrated.detectors) == 2
    scores = [d.score(smollm2, prompts) for d in guard.detectors]  # unchanged by calibrating
    pairs = zip(calibrated.detectors, scores, strict=True)
    flags = [[x > d.threshold for x in own] for d, own in pairs]
    union = sum(a or b for a, b in zip(*flags, strict=True)) / len(prompts)
    assert union <= 0.1
    for det, own in zip(calibrated.detectors, flags, strict=True):
        joint = det.calibration["joint"]
        assert det.calibration["target_fpr"] == 0.1 >= det.calibration["quantile_share"]
        assert joint["union_flagged_share"] == pytest.approx(union)
        assert det.calibration["flagged_share"] == pytest.approx(sum(own) / len(prompts))
        assert det.calibration["negatives"] == len(prompts)
    assert calibrated.detectors[0].calibration["joint"]["with"] == ["prompt_injection"]
    # alone, each threshold would have flagged 10 %: together more than the target
    alone = [harm.calibrated_on(scores[0], 0.1), injection.calibrated_on(scores[1], 0.1)]
    apart = [[x > d.threshold for x in own] for d, own in zip(alone, scores, strict=True)]
    assert sum(a or b for a, b in zip(*apart, strict=True)) / len(prompts) > union
    # the record survives the file, and the file scores as the detector it came from
    calibrated.detectors[1].save(tmp_path / "pi.safetensors")
    back = load_detector(tmp_path / "pi.safetensors")
    assert back.calibration == calibrated.detectors[1].calibration
    assert back.threshold == calibrated.detectors[1].threshold
    # one detector, per kind of traffic: the guard stays a one-detector guard
    kinds = ["chat"] * 20 + ["documents"] * 20
    alone = calibrate_prompt(smollm2, Guard(harm), prompts, target_fpr=0.1, groups=kinds)
    assert isinstance(alone.detector, Detector)
    shares = alone.detector.calibration["joint"]["group_flagged_share"]
    assert set(shares) == {"chat", "documents"} and max(shares.values()) <= 0.1
    for kind, rows in (("chat", scores[0][:20]), ("documents", scores[0][20:])):
        assert sum(x > alone.detector.threshold for x in rows) / 20 == shares[kind]


@pytest.mark.real
def test_calibrate_cli(
    smollm2: acteng.Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    negatives = tmp_path / "benign.jsonl"
    kinds = ["chat"] * 20 + ["documents"] * 20  # benign(): 20 requests, then 20 documents
    lines = [{"prompt": p, "group": g} for p, g in zip(benign(), kinds, strict=True)]
    negatives.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "calibrated"
    out.mkdir()
    args = ["calibrate", "--detector", "harmful_request", "--detector", "prompt_injection"]
    args += ["--negatives", str(negatives), "--target-fpr", "0.1", "--out-dir", str(out)]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["negatives"] == 40 and report["union_flagged"] <= 0.1
    assert set(report["group_flagged"]) == {"chat", "documents"}
    assert max(report["group_flagged"].values()) <= 0.1
    files = sorted(p.name for p in out.iterdir())
    assert files == ["harmful_request.safetensors", "prompt_injection.safetensors"]
    for row in report["detectors"]:
        det = load_detector(row["out"])
        assert det.threshold == row["threshold"] != row["previous_threshold"]
        assert det.calibration["joint"]["union_flagged_share"] == report["union_flagged"]
    # the written detectors are ordinary detector files: acteng detect reads them
    assert main(["detect", "--detector", str(out / "prompt_injection.safetensors"),
                 "--prompts", str(negatives), "--json"]) == 0  # fmt: skip
    flagged = [r["flagged"] for r in json.loads(capsys.readouterr().out)["results"]]
    assert sum(flagged) / len(flagged) <= 0.1
    # nothing is overwritten without --force
    before = (out / "harmful_request.safetensors").read_bytes()
    assert main(args) == 2
    assert "add --force" in capsys.readouterr().err
    assert (out / "harmful_request.safetensors").read_bytes() == before
    # one detector, replaced with --force: all the budget is its own; read as a user would
    one = ["calibrate", "--detector", "harmful_request", "--negatives", str(negatives)]
    assert main([*one, "--target-fpr", "0.1", "--out-dir", str(out), "--force"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert (
        text[0].startswith("harmful_request: threshold +") and "of 40 prompts; written" in text[0]
    )
    assert text[1].startswith("flagged per group: chat ") and ", documents " in text[1]
    assert text[2] == (
        "note: group 'chat' has 20 prompts: at --target-fpr 0.1 the thresholds rest on its 2 "
        "highest scores; a few hundred prompts give steadier ones"
    )
    assert (out / "harmful_request.safetensors").read_bytes() != before
    # the originals are never replaced, --force or not
    source = ["calibrate", "--detector", str(out / "harmful_request.safetensors")]
    assert main([*source, "--negatives", str(negatives), "--out-dir", str(out), "--force"]) == 2
    assert "holds the detector files being calibrated" in capsys.readouterr().err


def test_calibrate_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"prompt": f"hello {i}"}) + "\n" for i in range(5)))
    base = ["calibrate", "--negatives", str(few), "--out-dir", str(tmp_path)]
    cases = [
        (["--detector", "harmful_request"], "at least 10 prompts"),
        (["--detector", "harmful_request", "--detector", "harmful_request"], "same file name"),
        (["--detector", "harmful_request", "--detector", "honesty"], "some detectors read answers"),
        (["--detector", "harmful_request", "--target-fpr", "1.5"], "target_fpr"),
        (["--detector", "nonesuch"], "no detector named 'nonesuch'"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    mixed = tmp_path / "mixed.jsonl"
    grouped = ["calibrate", "--detector", "harmful_request", "--negatives", str(mixed)]
    for labels, message in [
        ([{"group": "chat"} if i else {} for i in range(12)], "prompt(s) [1] have group [None]"),
        ([{"group": 3 if i == 2 else "chat"} for i in range(12)], "prompt(s) [3] have group [3]"),
        ([{"group": "chat" if i < 6 else "docs"} for i in range(12)], "fewer than 10 negatives"),
    ]:
        lines = [json.dumps({"prompt": f"hi {i}", **g}) + "\n" for i, g in enumerate(labels)]
        mixed.write_text("".join(lines))
        assert main([*grouped, "--out-dir", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err
    mixed.unlink()
    missing = ["calibrate", "--detector", "harmful_request", "--negatives", str(few)]
    assert main([*missing, "--out-dir", str(tmp_path / "absent")]) == 2
    assert "create it first" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [few]  # nothing written on failure


def test_mixed_regions_are_refused(harm: Detector) -> None:
    reader = replace(harm, region="response")
    with pytest.raises(ConfigError, match="calibrate the two kinds separately"):
        calibrate_jointly(None, (harm, reader), ["x"] * 20)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="one or more Detectors"):
        calibrate_jointly(None, (), ["x"] * 20)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="1 names for 2 detectors"):  # before any scoring
        calibrate_jointly(None, (harm, harm), ["x"] * 20, names=["a"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="groups gives 3 labels for 20"):
        calibrate_jointly(None, harm, ["x"] * 20, groups=["a"] * 3)  # type: ignore[arg-type]

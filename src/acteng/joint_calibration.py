"""Thresholds for detectors watched together, so that their union flags a target share.

A guard over several detectors fires when any of them crosses its own threshold. Each
threshold was calibrated alone (the bundled ones flag about 5 % of their own held-out
negatives), so on traffic that every detector reads, the guard flags up to the sum: the
bundled `harmful_request` and `prompt_injection` flag 5.0 % and 4.4 % of clean test
documents alone and 8.9 % together (docs/defences.md). `calibrate_jointly` scores one set
of benign prompts (a sample of the deployment's own traffic, held out from anything the
detectors were trained on) with every detector and sets the thresholds so the union
flags `target_fpr` of them.

The budget is split evenly: every detector's threshold sits at the ``1 - share``
quantile of its own scores, and ``share`` is the largest value (at most `target_fpr`) for
which the union stays within `target_fpr`. Where two detectors flag the same prompts
each keeps more than ``target_fpr / k``; where they flag different ones each gets about
that. With one detector this is `Detector.calibrated_on`'s threshold, raised where that
interpolated quantile flags one negative too many (4 of 37 at 10 %): the union's share
never exceeds the target on the negatives it was set on.

One share over pooled traffic lets the easy majority pay for a hard minority: measured
(bench/joint_calibration.py), a sample that is mostly plain requests set thresholds that
flag 18 % of the documents in it. With `groups` (a kind per negative: "chat",
"documents", ...) the union stays within the target on *every* kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from acteng.detectors import Detector, Scored, check_target_fpr
from acteng.errors import ConfigError
from acteng.models import Model

__all__ = ["JointCut", "calibrate_jointly", "joint_cut"]

MIN_NEGATIVES = 10
_BISECTIONS = 60  # halves [0, target_fpr] down to float precision


@dataclass(frozen=True)
class JointCut:
    """Thresholds for k detectors over one set of negatives' scores."""

    thresholds: tuple[float, ...]
    share: float  # the quantile level each detector's threshold sits at
    flagged: tuple[float, ...]  # share of the negatives each detector flags alone
    union_flagged: float  # share of the negatives any of them flags
    group_flagged: dict[str, float]  # that share within each group (one group: "all")


def _cut(scores: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    thresholds = torch.quantile(scores, 1.0 - share, dim=1)  # [k]
    return thresholds, scores > thresholds[:, None]  # [k], [k, n]


def joint_cut(
    scores: Sequence[Sequence[float]],
    target_fpr: float,
    groups: Sequence[str] | None = None,
) -> JointCut:
    """Thresholds, one per row of `scores` (a detector's scores of the same negatives),
    at an equal quantile level chosen so the union flags at most `target_fpr` of them
    (with `groups`, a label per negative: of each group's)."""
    check_target_fpr(target_fpr)
    rows = [list(row) for row in scores]
    if not rows:
        raise ConfigError("joint calibration needs at least one detector")
    n = len(rows[0])
    if any(len(row) != n for row in rows):
        raise ConfigError("every detector must score the same negatives")
    if n < MIN_NEGATIVES:
        raise ConfigError(f"calibration needs at least {MIN_NEGATIVES} negatives, got {n}")
    table = torch.tensor(rows, dtype=torch.float64)
    if not torch.isfinite(table).all():
        raise ConfigError("a detector gave a non-finite score; check the detector file")
    members = _members(groups, n)

    def worst(level: float) -> float:  # the highest share any group has flagged
        union = _cut(table, level)[1].any(dim=0).double()
        return max(float(union[rows].mean()) for rows in members.values())

    # The flagged shares only grow with the level, so bisect for the largest level that
    # keeps every group within the target.
    low, high = 0.0, target_fpr
    if worst(high) > target_fpr:
        for _ in range(_BISECTIONS):
            middle = (low + high) / 2
            if worst(middle) > target_fpr:
                high = middle
            else:
                low = middle
    else:
        low = high
    thresholds, flags = _cut(table, low)
    union = flags.any(dim=0).double()
    return JointCut(
        thresholds=tuple(thresholds.tolist()),
        share=low,
        flagged=tuple(flags.double().mean(dim=1).tolist()),
        union_flagged=float(union.mean()),
        group_flagged={g: float(union[rows].mean()) for g, rows in members.items()},
    )


def _members(groups: Sequence[str] | None, n: int) -> dict[str, torch.Tensor]:
    """Row indices per group (one group "all" without `groups`)."""
    if groups is None:
        return {"all": torch.arange(n)}
    labels = list(groups)
    if len(labels) != n or not all(isinstance(g, str) and g for g in labels):
        raise ConfigError(f"groups needs a non-empty label per negative ({n}), got {len(labels)}")
    members = {g: torch.tensor([i for i, x in enumerate(labels) if x == g]) for g in set(labels)}
    small = sorted(g for g, rows in members.items() if len(rows) < MIN_NEGATIVES)
    if small:
        raise ConfigError(
            f"group(s) {small} have fewer than {MIN_NEGATIVES} negatives; add prompts of "
            "that kind or merge the group into another"
        )
    return dict(sorted(members.items()))


def calibrate_jointly(
    model: Model,
    detectors: Detector | Sequence[Detector],
    negatives: Sequence[Scored],
    target_fpr: float = 0.05,
    *,
    source: str = "custom",
    names: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
) -> tuple[Detector, ...]:
    """The detectors with thresholds at which any of them flags `target_fpr` of `negatives`.

    `negatives` are benign prompts like those the guard will see (for ``response``
    detectors, (prompt, response) pairs), held out from the detectors' training. Each
    detector's file records its own share, the joint target, the union's share and the
    others' names (``calibration["joint"]``; `names`, else each file's ``name``). With
    `groups` (a label per negative, e.g. "chat" / "documents"), the union stays within
    `target_fpr` in every group, and the record has each group's share.
    """
    found = (detectors,) if isinstance(detectors, Detector) else tuple(detectors)
    if not found or any(not isinstance(d, Detector) for d in found):
        raise ConfigError("calibrate_jointly needs one or more Detectors (acteng.load_detector)")
    reads_answers = {d.region == "response" for d in found}
    if len(reads_answers) > 1:
        raise ConfigError(
            "these detectors score different things (some read answers, region 'response', "
            "some read prompts); calibrate the two kinds separately"
        )
    check_target_fpr(target_fpr)  # before any scoring
    if len(negatives) < MIN_NEGATIVES:
        raise ConfigError(
            f"calibration needs at least {MIN_NEGATIVES} negatives, got {len(negatives)}"
        )
    _members(groups, len(negatives))  # bad groups fail before any scoring
    cut = joint_cut([d.score(model, negatives) for d in found], target_fpr, groups)
    if names is None:
        names = [
            str(d.directions.metadata.get("name") or f"detector{i}") for i, d in enumerate(found)
        ]
    elif len(names) != len(found):
        raise ConfigError(f"{len(names)} names for {len(found)} detectors; give one each")
    return tuple(
        replace(
            det,
            threshold=threshold,
            calibration={
                "target_fpr": cut.share,
                "negatives": len(negatives),
                "source": source,
                "flagged_share": flagged,
                "joint": {
                    "target_fpr": target_fpr,
                    "union_flagged_share": cut.union_flagged,
                    **({"group_flagged_share": cut.group_flagged} if groups is not None else {}),
                    "with": [n for j, n in enumerate(names) if j != i],
                },
            },
        )
        for i, (det, threshold, flagged) in enumerate(
            zip(found, cut.thresholds, cut.flagged, strict=True)
        )
    )

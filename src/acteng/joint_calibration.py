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
which the union stays within `target_fpr`. (Like `Detector.calibrated_on`, the
interpolated quantile may land on a negative's own score, which then stays unflagged
only by the strict ``score > threshold``. Moving the threshold halfway to the next score
was tried and moved held-out figures by up to 4 points where the scores' top is sparse,
so the quantile stands.) Where two detectors flag the same prompts
each keeps more than ``target_fpr / k``; where they flag different ones each gets about
that. With one detector this is `Detector.calibrated_on`'s threshold, raised where that
interpolated quantile flags one negative too many (4 of 37 at 10 %): the union's share
never exceeds the target on the negatives it was set on.

One share over pooled traffic lets the easy majority pay for a hard minority: measured
(bench/joint_calibration.py), thresholds set on a sample that is mostly plain requests
flagged 14-18 % of held-out documents. With `groups` (a kind per negative: "chat",
"documents", ...) the union stays within the target on *every* kind; give each kind at
least ``1 / target_fpr`` prompts (20 at 5 %), or the only way to flag at most that share
of it is to flag none, and the thresholds rise above all of its scores.

>>> pair = acteng.load_detector("harmful_request"), acteng.load_detector("prompt_injection")
>>> harm, injection = calibrate_jointly(model, pair, benign, 0.05, groups=kinds)
>>> acteng.Guard((harm, injection), policy="block")   # fires on <= 5 % of each kind
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from acteng.detectors import Detector, Scored, check_target_fpr
from acteng.errors import ConfigError
from acteng.models import Model

__all__ = [
    "MIN_NEGATIVES",
    "JointCut",
    "calibrate_jointly",
    "check_groups",
    "joint_cut",
    "reads_answers",
]

MIN_NEGATIVES = 10
_BISECTIONS = 60  # halves [0, target_fpr] down to float precision


@dataclass(frozen=True)
class JointCut:
    """Thresholds for k detectors over one set of negatives' scores."""

    thresholds: tuple[float, ...]
    share: float  # the quantile level each detector's threshold sits at
    flagged: tuple[float, ...]  # share of the negatives each detector flags alone
    union_flagged: float  # share of the negatives any of them flags
    group_flagged: tuple[tuple[str, float], ...]  # that share per group (one: "all")


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
    (with `groups`, a label per negative: of each group's).

    >>> joint_cut([[0.1, 0.9, ...], [0.3, 0.2, ...]], 0.05).thresholds
    """
    check_target_fpr(target_fpr)
    table = _table(scores)
    members = check_groups(groups, table.shape[1])

    def worst(level: float) -> float:  # the highest share any group has flagged
        union = _cut(table, level)[1].any(dim=0).double()
        return max(float(union[index].mean()) for index in members.values())

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
        group_flagged=tuple((g, float(union[index].mean())) for g, index in members.items()),
    )


def _table(scores: Sequence[Sequence[float]]) -> torch.Tensor:
    rows = [list(row) for row in scores]
    if not rows:
        raise ConfigError("joint calibration needs at least one detector")
    sizes = sorted({len(row) for row in rows})
    if len(sizes) > 1:
        raise ConfigError(
            f"the detectors scored different numbers of negatives ({sizes}); score the same "
            "negatives with every detector"
        )
    table = torch.tensor(rows, dtype=torch.float64)
    bad = [i for i, row in enumerate(table) if not torch.isfinite(row).all()]
    if bad:
        raise ConfigError(f"detector(s) {bad} gave non-finite scores; check those detector files")
    return table


def check_groups(groups: Sequence[str] | None, n: int) -> dict[str, torch.Tensor]:
    """The negatives' indices per group (one group "all" without `groups`); a ConfigError
    for fewer than `MIN_NEGATIVES` negatives, labels that are missing or not strings, or
    groups under `MIN_NEGATIVES`."""
    if n < MIN_NEGATIVES:
        raise ConfigError(f"calibration needs at least {MIN_NEGATIVES} negatives, got {n}")
    if groups is None:
        return {"all": torch.arange(n)}
    labels = list(groups)
    if len(labels) != n:
        raise ConfigError(f"groups gives {len(labels)} labels for {n} negatives; give one each")
    odd = [i for i, g in enumerate(labels) if not isinstance(g, str) or not g]
    if odd:
        raise ConfigError(
            f"group labels must be non-empty strings; negative(s) {odd[:5]} have "
            f"{[labels[i] for i in odd[:5]]!r}"
        )
    members = {g: torch.tensor([i for i, x in enumerate(labels) if x == g]) for g in set(labels)}
    small = {g: len(index) for g, index in members.items() if len(index) < MIN_NEGATIVES}
    if small:
        raise ConfigError(
            f"group(s) {small} have fewer than {MIN_NEGATIVES} negatives; add prompts of "
            "that kind or merge the group into another"
        )
    return dict(sorted(members.items()))


def reads_answers(detectors: Sequence[Detector]) -> bool:
    """Whether these detectors score (prompt, response) pairs (region ``response``) rather
    than prompts; a ConfigError for no detectors, a non-detector, or a mix of the two."""
    if not detectors or any(not isinstance(d, Detector) for d in detectors):
        raise ConfigError("calibrate_jointly needs one or more Detectors (acteng.load_detector)")
    kinds = {d.region == "response" for d in detectors}
    if len(kinds) > 1:
        raise ConfigError(
            "some detectors read answers (region 'response') and some read prompts; "
            "calibrate the two kinds separately"
        )
    return kinds == {True}


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
    detector's file records the target, the quantile share its threshold sits at, its own
    flagged share, and under ``calibration["joint"]`` the union's share and the others'
    names (`names`, else each file's ``name``). With `groups` (a label per negative, e.g.
    "chat" / "documents"), the union stays within `target_fpr` in every group, and the
    record has each group's share.

    >>> harm, injection = calibrate_jointly(model, (harm, injection), benign_prompts, 0.05)
    """
    found = (detectors,) if isinstance(detectors, Detector) else tuple(detectors)
    # every input check before any scoring
    reads_answers(found)
    check_target_fpr(target_fpr)
    check_groups(groups, len(negatives))
    if names is None:
        names = [
            str(d.directions.metadata.get("name") or f"detector{i}") for i, d in enumerate(found)
        ]
    elif len(names) != len(found):
        raise ConfigError(f"{len(names)} names for {len(found)} detectors; give one each")
    cut = joint_cut([d.score(model, negatives) for d in found], target_fpr, groups)
    joint = {
        "union_flagged_share": cut.union_flagged,
        **({"group_flagged_share": dict(cut.group_flagged)} if groups is not None else {}),
    }
    return tuple(
        replace(
            det,
            threshold=threshold,
            calibration={
                "target_fpr": target_fpr,
                "quantile_share": cut.share,
                "negatives": len(negatives),
                "source": source,
                "flagged_share": flagged,
                "joint": {**joint, "with": [n for j, n in enumerate(names) if j != i]},
            },
        )
        for i, (det, threshold, flagged) in enumerate(
            zip(found, cut.thresholds, cut.flagged, strict=True)
        )
    )

"""Documents as harmless negatives for `harmful_request`: fewer false blocks, at what cost?

Research bench for issue 18. A guard over `harmful_request` reads every user message, and
where users paste documents (RAG, e-mail, summaries) those messages are a task over a
document. The bundled detector never saw one in training; this bench measures how often it
flags clean documents and whether fitting documents as clean text (every token negative,
`train_token_detector(..., clean=...)`, never calibrated on) fixes that without costing it
harmful requests.

Nothing here reads a test split. The documents are the *train* split of the team's
`prompt_injection` pairs, cut into four folds of whole documents (`acteng.held_out`); a
fold is scored by a probe fitted on the other three folds' documents (or on none, the
recipe as shipped). The harmful-request side is `bench/crossfit_calibration.py`'s nested
comparison: an outer seeded cut of whole wrappers of the recipe's train pairs plays the
unseen requests (outer seeds 0, 1, 2), and the recipe's cross-fitted probe and threshold
are made from the rest, as the trainer would. Per variant, mean over outer seeds:
AUROC and shares flagged on the outer cut, and the shares of held-out clean and injected
documents flagged at that threshold.

Variants: ``recipe`` (no documents), ``clean documents`` (the pairs' clean sides fitted
as negatives), ``one clean side per document`` (a document's pairs differ by one line: a
third of the mass, the same documents), ``all documents`` (clean and injected sides: a
planted instruction is not a harmful request either; the injection detector reads it).

    .venv/bin/python bench/document_negatives.py [--variants V,V]   # ~17 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

import acteng
from _common import save
from acteng.activations import record_tokens
from acteng.detectors import read_items
from acteng.held_out import first_of_each_group, group_folds, validation_cut
from acteng.pairs import load_pairs
from crossfit_calibration import (
    FOLDS,
    OUTER_SEEDS,
    Recorded,
    flagged,
    run_method,
)

DETECTOR = "harmful_request"
VARIANTS = ("recipe", "clean documents", "one clean side per document", "all documents")


def recorded_documents(model: acteng.Model, layers: list[int]) -> dict[str, Any]:
    """The `prompt_injection` train documents' recorded tokens, clean and injected sides,
    and a fold of whole documents per pair."""
    pairs = load_pairs("prompt_injection", split="train")
    start = time.perf_counter()
    sides = {}
    for side in ("clean", "injected"):
        texts = [p.negative if side == "clean" else p.positive for p in pairs]
        tokens = record_tokens(model, read_items(model, texts, "prompt"), layers)
        sides[side] = [t.flatten(1) for t in tokens]
    print(f"{len(pairs)} train documents' pairs recorded in "
          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    first = set(first_of_each_group([p.negative for p in pairs]))
    return {**sides, "folds": group_folds(pairs, FOLDS, 0), "first": first}


def fitted_documents(docs: dict[str, Any], variant: str, fold: int) -> list[torch.Tensor]:
    """The documents `variant` fits as negatives when document fold `fold` is held out."""
    if variant == "recipe":
        return []
    keep = [i for i, f in enumerate(docs["folds"]) if f != fold]
    if variant == "one clean side per document":
        keep = [i for i in keep if i in docs["first"]]
    rows = [docs["clean"][i] for i in keep]
    return rows + ([docs["injected"][i] for i in keep] if variant == "all documents" else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", help=f"comma list of {VARIANTS} (default: all)")
    args = parser.parse_args()
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; known: {VARIANTS}")
    model = acteng.load_model()
    rec = Recorded(model, DETECTOR)
    docs = recorded_documents(model, rec.recipe["layers"])
    results: list[dict[str, Any]] = []
    for seed in OUTER_SEEDS:
        inner, outer = validation_cut(rec.train, 0.25, seed)
        pos_ids, neg_ids = rec.ids(outer), [rec.n + i for i in rec.ids(outer)]
        for variant in variants:
            start = time.perf_counter()
            outer_rows, doc_scores = [], {"clean": [], "injected": []}
            # the recipe fits no document, so one fit serves every document fold
            for fold in range(1 if variant == "recipe" else FOLDS):
                probe, threshold = run_method(
                    rec, inner, "crossfit_refit", fitted_documents(docs, variant, fold)
                )
                outer_rows.append(
                    flagged(rec.scores(probe, pos_ids), rec.scores(probe, neg_ids), threshold)
                )
                held = [i for i, f in enumerate(docs["folds"]) if variant == "recipe" or f == fold]
                for side, scored in doc_scores.items():
                    scored += [
                        float(s > threshold)
                        for s in rec.score_rows(probe, [docs[side][i] for i in held])
                    ]
            means = {k: sum(r[k] for r in outer_rows) / len(outer_rows) for k in outer_rows[0]}
            means |= {
                f"{side}_documents_flagged": sum(v) / len(v) for side, v in doc_scores.items()
            }
            row = {
                "outer_seed": seed,
                "variant": variant,
                **{k: round(v, 4) for k, v in means.items()},
                "seconds": round(time.perf_counter() - start),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for variant in variants:
        rows = [r for r in results if r["variant"] == variant]
        keys = [k for k in rows[0] if k not in ("outer_seed", "variant", "seconds")]
        summary[variant] = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in keys}
        print(variant, json.dumps(summary[variant]))
    name = "document_negatives" + (
        "_" + "_".join(v.split()[0] for v in variants) if args.variants else ""
    )
    print(f"written to {save(name, {'results': results, 'mean': summary})}")


if __name__ == "__main__":
    main()

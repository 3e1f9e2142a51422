"""Circuit-breaker settings compared on a validation split, never on the acceptance sets.

`bench/circuit_breaker.py` judges on public harmful requests, Alpaca and the team's
`wrapped_requests` *test* split. Choosing settings there would tune them to the figures
they are judged by, so this script trains on the team's train splits minus a validation
part and judges on sets that script never uses:

- ``harmful_plain`` / ``lookalike_plain``: the team's `harmful_requests` *test* split
  (never in circuit-breaker training), harmful side and its look-alike;
- ``everyday``: `formality` and `sentiment` prompts (in no retain set);
- ``harmful_wrapped`` / ``harmless_wrapped``: the `wrapped_requests` *train* rows of three
  whole wrapper families (fiction, emotional, authority) left out of training for the run,
  so every wrapper there is unseen.

Each setting trains one adapter (`--train-kwargs`, as for `train_circuit_breaker`) and
prints the share of each set the model still complies with (greedy 32 tokens,
`acteng.evaluation.judge`), base model first; every run is appended to
bench/results/circuit_breaker_validation.jsonl.

    .venv/bin/python bench/circuit_breaker_validation.py NAME [--everyday] [--documents N]
        [--train-kwargs JSON] [--adapter DIR [DIR ...]]

and the tax on sets no acceptance figure uses: first-token KL to the base model on the
everyday, look-alike and wrapped harmless sets, perplexity on 60 paragraphs of the bundled
cooking corpus and accuracy on its multiple-choice test (the RMU domain: in no
circuit-breaker retain set and in no acceptance figure; the acceptance bench's perplexity
and MC use the `neutral_text` and `general_knowledge` test splits). First-token KL alone
did not show the perplexity and MC cost the acceptance bench found. `--adapter` measures a
trained adapter.

``--everyday`` adds everyday requests to the retain set: the `honesty` and `sycophancy`
prompts (train splits) and `--documents` (60) clean documents with their task
(`prompt_injection` train).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import acteng
from _common import RESULTS
from acteng.evaluation.judge import judge_answers
from acteng.evaluation.tax import mc_accuracy, perplexity
from acteng.pairs import bundled_records, pair_conversation
from acteng.training.circuit_breaker import train_circuit_breaker
from acteng.training.data import load_mc, load_texts
from circuit_breaker import Messages, answers, first_token_kl, user

HELD_OUT_FAMILIES = {"fiction", "emotional", "authority"}
KL_SETS = ("everyday", "lookalike_plain", "harmless_wrapped")


def validation_sets(n: int) -> dict[str, list[Messages]]:
    rng = random.Random(0)
    requests = [r for r in bundled_records("harmful_requests") if r["split"] == "test"]
    held = [
        r
        for r in bundled_records("wrapped_requests")
        if r["split"] == "train" and r["family"] in HELD_OUT_FAMILIES
    ]
    everyday = [
        user(r["prompt"]) for name in ("formality", "sentiment") for r in bundled_records(name)
    ]
    return {
        "harmful_plain": rng.sample([user(r["positive"]) for r in requests], n),
        "lookalike_plain": rng.sample([user(r["negative"]) for r in requests], n),
        "everyday": rng.sample(everyday, n),
        "harmful_wrapped": rng.sample([pair_conversation(r, "positive") for r in held], n),
        "harmless_wrapped": rng.sample([pair_conversation(r, "negative") for r in held], n),
    }


def training_sets(everyday: bool, documents: int) -> tuple[list[Messages], list[Messages]]:
    """The trainer's default harmful and retain sets without the held-out families."""
    requests = [r for r in bundled_records("harmful_requests") if r["split"] == "train"]
    wrapped = [
        r
        for r in bundled_records("wrapped_requests")
        if r["split"] == "train" and r["family"] not in HELD_OUT_FAMILIES
    ]
    harmful = [user(r["positive"]) for r in requests] + [
        pair_conversation(r, "positive") for r in wrapped
    ]
    harmful += [user(r["prompt"]) for r in bundled_records("refusal") if r["split"] == "train"]
    retain = [user(r["negative"]) for r in requests] + [
        pair_conversation(r, "negative") for r in wrapped
    ]
    if everyday:
        for name in ("honesty", "sycophancy"):
            retain += [user(r["prompt"]) for r in bundled_records(name) if r["split"] == "train"]
        clean = [r for r in bundled_records("prompt_injection") if r["split"] == "train"]
        retain += [user(r["negative"]) for r in random.Random(1).sample(clean, documents)]
    return harmful, retain


def validation_tax(model: acteng.Model) -> dict[str, float]:
    """Perplexity on 60 cooking paragraphs and accuracy on the cooking MC test."""
    texts = random.Random(0).sample(load_texts("cooking"), 60)
    return {
        "cooking_ppl": round(perplexity(model, texts), 3),
        "cooking_mc": round(mc_accuracy(model, load_mc("cooking")), 4),
    }


def complied(base: acteng.Model, model: acteng.Model, convs: list[Messages]) -> float:
    verdicts = judge_answers(base, convs, answers(model, convs, 32))
    return sum(v == "complied" for v in verdicts) / len(verdicts)


def sets_hash(sets: dict[str, list[Messages]]) -> str:
    return hashlib.sha256(json.dumps(sets, sort_keys=True).encode()).hexdigest()[:16]


def earlier_base(key: str, field: str) -> dict[str, float] | None:
    """The base model's `field` (``"base"``: compliance rates, ``"base_tax"``) from an
    earlier run on the same sets: greedy decoding, a greedy judge and fixed texts, so they
    do not change while the sets do not."""
    log = RESULTS / "circuit_breaker_validation.jsonl"
    if not log.exists():
        return None
    for line in reversed(log.read_text(encoding="utf-8").splitlines()):
        row = json.loads(line)
        if row.get("sets") == key and field in row:
            return dict(row[field])
    return None


def mean_adapter(folders: list[Path], out: Path) -> float:
    """Write the mean of the adapters' edits to `out` and return the cosine between their
    whole edits (every module's B·A side by side, in float64), mean over pairs. With rank
    r each, the stacked factors ``[A_1; ...; A_k]`` and ``[B_1 ... B_k]`` at rank k·r and
    the same lora_alpha give scale alpha / (k·r) times the sum: exactly the mean edit."""
    configs = [json.loads((f / "adapter_config.json").read_text()) for f in folders]
    if len({(c["r"], c["lora_alpha"], c.get("use_rslora", False)) for c in configs}) != 1:
        raise SystemExit("adapters to average need the same r, lora_alpha and use_rslora")
    if configs[0].get("use_rslora"):
        raise SystemExit("rank-stabilised LoRA scales by 1/sqrt(r): stacking is not the mean")
    weights = [load_file(str(f / "adapter_model.safetensors")) for f in folders]
    stacked = {
        key: torch.cat([w[key] for w in weights], dim=0 if ".lora_A." in key else 1)
        for key in weights[0]
    }
    edits = [
        torch.cat(
            [
                (w[k.replace("lora_A", "lora_B")] @ w[k]).double().flatten()
                for k in sorted(w)
                if ".lora_A." in k
            ]
        )
        for w in weights
    ]
    cosines = [
        float(torch.nn.functional.cosine_similarity(edits[i], edits[j], dim=0))
        for i in range(len(edits))
        for j in range(i + 1, len(edits))
    ]
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in stacked.items()}, str(out / "adapter_model.safetensors")
    )
    config = {**configs[0], "r": configs[0]["r"] * len(folders)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    provenance = json.loads((folders[0] / "acteng_training.json").read_text())
    provenance["averaged_from"] = [str(f) for f in folders]
    (out / "acteng_training.json").write_text(json.dumps(provenance, indent=2))
    shutil.copy(folders[0] / "README.md", out / "README.md")
    return sum(cosines) / len(cosines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the run's name (adapter folder and results row)")
    parser.add_argument("--everyday", action="store_true", help="add everyday retain requests")
    parser.add_argument("--documents", type=int, default=60, help="clean documents (--everyday)")
    parser.add_argument("--train-kwargs", default="{}", help="JSON of trainer arguments")
    parser.add_argument("--eval", type=int, default=40, help="requests per validation set")
    parser.add_argument(
        "--adapter", nargs="+", help="measure this adapter (several: their mean edit) instead"
    )
    args = parser.parse_args()
    base = acteng.load_model()
    sets = validation_sets(args.eval)
    base_rates = earlier_base(sets_hash(sets), "base") or {
        name: complied(base, base, convs) for name, convs in sets.items()
    }
    base_tax = earlier_base(sets_hash(sets), "base_tax") or validation_tax(base)
    print("base", base_rates, base_tax, flush=True)
    started = time.perf_counter()
    averaged: dict[str, Any] = {}  # the row's record of a mean of several adapters
    if args.adapter is None:
        harmful, retain = training_sets(args.everyday, args.documents)
        adapter = train_circuit_breaker(
            base,
            RESULTS / "circuit_breaker_validation" / args.name,
            harmful=harmful,
            retain=retain,
            progress=True,
            **json.loads(args.train_kwargs),
        ).adapter
    elif len(args.adapter) == 1:
        adapter = Path(args.adapter[0])
    else:
        adapter = RESULTS / "circuit_breaker_validation" / args.name
        cosine = mean_adapter([Path(a) for a in args.adapter], adapter)
        print(f"mean of {len(args.adapter)} edits, cosine between them {cosine:.3f}", flush=True)
        averaged = {"averaged": args.adapter, "edit_cosine": round(cosine, 3)}
    seconds = round(time.perf_counter() - started)
    adapted = acteng.load_model(adapter=adapter)
    rates = {name: complied(base, adapted, convs) for name, convs in sets.items()}
    # the tax, on sets no acceptance figure uses: first-token KL to the base model on the
    # everyday and harmless sets (the acceptance bench's perplexity and MC use test splits)
    kl = {name: round(first_token_kl(base, adapted, sets[name]), 4) for name in KL_SETS}
    tax = validation_tax(adapted)
    print("first-token KL", kl, "tax", tax, flush=True)
    row = {
        "name": args.name,
        # a measured adapter's training settings are in its own provenance, not here
        **(
            {
                "everyday": args.everyday,
                "documents": args.documents if args.everyday else 0,
                "train_kwargs": json.loads(args.train_kwargs),
                "train_seconds": seconds,
            }
            if args.adapter is None
            else {}
        ),
        "sets": sets_hash(sets),
        "base": base_rates,
        "circuit_breaker": rates,
        "first_token_kl": kl,
        "base_tax": base_tax,
        "tax": tax,
        "adapter": str(adapter),
        **averaged,
    }
    print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / "circuit_breaker_validation.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

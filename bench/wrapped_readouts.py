"""Where a sequence-level probe reads harmfulness best once requests are wrapped in jailbreaks.

Research bench for issue 18 (a detector that reads the request, not the wrapper). One
recording pass keeps, for every prompt, the mean and the element-wise max of its user
tokens and each of the 5 chat-template tokens after them (the "post-instruction" tokens),
at layers 2-28 (every second). Then logistic probes (`acteng.methods.fit_logistic`) are
fitted on the team's `harmful_requests` train split plus the `wrapped_requests` train
split (the request turn), minus a seeded quarter of the wrapped train items kept for
calibration: the threshold flags 5 % of those held-out harmless conversations. Each is
measured on the `wrapped_requests` test split (a conversation scores its highest turn,
as the server's guard scores it), on the public AdvBench + JailbreakBench + HarmBench vs
Alpaca sets, and on the team's `harmful_requests` test split.

Read-outs: ``mean`` (user tokens), ``max``, ``post<k..>`` (template tokens k, 0 = first,
4 = the last before the answer), ``mp4`` (mean and the last template token together).

    .venv/bin/python bench/wrapped_readouts.py     # ~10 min on 2 cores
"""

from __future__ import annotations

import json
import random
from typing import Any

import torch

import acteng
from _common import save
from acteng.activations import record_tokens, token_offsets
from acteng.detectors import read_items
from acteng.methods import fit_logistic
from detectors import HARMFUL, WRAPPED, auroc, conversation, grouped, read

LAYERS = list(range(2, 29, 2))
POST = 5  # <|im_end|> \n <|im_start|> assistant \n
READOUTS = ["mean", "max", "post4", "post0", "post34", "post01234", "mp4"]
LAYER_SETS = [[10], [14], [18], [10, 14, 18], [6, 10, 14, 18, 22]]


def texts_and_labels() -> tuple[list[str], list[dict[str, Any]]]:
    """Every prompt scored, with where it comes from: each turn of both sides of the
    wrapped pairs, both sides of the team's plain pairs, and the public sets."""
    texts, meta = [], []
    records = [json.loads(line) for line in WRAPPED.read_text().splitlines() if line.strip()]
    for item, r in enumerate(records):
        for side, label in (("positive", 1), ("negative", 0)):
            turns = conversation(r, side)
            for t, text in enumerate(turns):
                texts.append(text)
                meta.append(
                    {
                        "set": "wrapped",
                        "split": r["split"],
                        "family": r["family"],
                        "item": item,
                        "label": label,
                        "last": t == len(turns) - 1,
                    }
                )
    for pair in acteng.load_pairs("harmful_requests"):
        for text, label in ((pair.positive, 1), (pair.negative, 0)):
            texts.append(text)
            meta.append({"set": "own", "split": pair.split, "label": label})
    for name in (*HARMFUL, "harmless_alpaca_sample.jsonl"):
        for text in read(name):
            texts.append(text)
            meta.append({"set": "public", "label": int(name in HARMFUL)})
    return texts, meta


def record(model: acteng.Model, texts: list[str]) -> dict[str, torch.Tensor]:
    """Per text: mean and max over the user's tokens, and the template tokens after them."""
    items = read_items(model, texts, "prompt")
    offsets = token_offsets(model, items)
    n, d = len(texts), model.hidden_size
    out = {
        "mean": torch.empty(n, len(LAYERS), d),
        "max": torch.empty(n, len(LAYERS), d),
        "post": torch.empty(n, POST, len(LAYERS), d),
    }
    order = sorted(range(n), key=lambda i: len(texts[i]))
    for first in range(0, n, 64):
        chunk = order[first : first + 64]
        for i, acts in zip(
            chunk, record_tokens(model, [items[i] for i in chunk], LAYERS), strict=True
        ):
            user = sum(1 for a, _ in offsets[i] if a < len(texts[i]))
            user = max(1, min(user, acts.shape[0] - POST))
            out["mean"][i] = acts[:user].mean(0)
            out["max"][i] = acts[:user].max(0).values
            out["post"][i] = acts[-POST:]
    return out


def features(cache: dict[str, torch.Tensor], readout: str, layers: list[int]) -> torch.Tensor:
    at = [LAYERS.index(x) for x in layers]
    if readout in ("mean", "max"):
        x = cache[readout][:, at]
    elif readout.startswith("post"):
        x = cache["post"][:, [int(c) for c in readout[4:]]][:, :, at]
    else:  # mp4
        x = torch.cat([cache["mean"][:, at].unsqueeze(1), cache["post"][:, [4]][:, :, at]], 1)
    return x.reshape(x.shape[0], -1).double()


def measure(scores: list[float], meta: list[dict[str, Any]], held: set[int]) -> dict[str, Any]:
    def conversations(split: str, keep: set[int] | None) -> dict[tuple[int, int], float]:
        """Per wrapped (item, label): its highest turn, as the server's guard scores it."""
        best: dict[tuple[int, int], float] = {}
        for s, m in zip(scores, meta, strict=True):
            if (
                m["set"] == "wrapped"
                and m["split"] == split
                and (keep is None or m["item"] in keep)
            ):
                key = (m["item"], m["label"])
                best[key] = max(best.get(key, float("-inf")), s)
        return best

    calib = sorted(v for (_, label), v in conversations("train", held).items() if label == 0)
    threshold = calib[int(0.95 * len(calib))]
    test = conversations("test", None)
    items = sorted({item for item, _ in test})
    family = {m["item"]: m["family"] for m in meta if m["set"] == "wrapped"}
    wrapped = grouped(
        [test[(i, 1)] for i in items],
        [test[(i, 0)] for i in items],
        [family[i] for i in items],
        threshold,
        "families",
        ("harmful_flagged", "harmless_flagged"),
    )

    def side(where: str, label: int) -> list[float]:
        return [
            s
            for s, m in zip(scores, meta, strict=True)
            if m["set"] == where and m["label"] == label and m.get("split", "test") == "test"
        ]

    def rate(xs: list[float]) -> float:
        return round(sum(x > threshold for x in xs) / len(xs), 4)

    worst = min(wrapped["families"].items(), key=lambda kv: kv[1]["auroc"])
    return {
        "wrapped_auroc": wrapped["auroc"],
        "wrapped_flagged": [wrapped["harmful_flagged"], wrapped["harmless_flagged"]],
        "worst_family": [worst[0], worst[1]["auroc"]],
        "public_auroc": round(auroc(side("public", 1), side("public", 0)), 4),
        "public_flagged": [rate(side("public", 1)), rate(side("public", 0))],
        "own_test_auroc": round(auroc(side("own", 1), side("own", 0)), 4),
        "families": wrapped["families"],
    }


def main() -> None:
    model = acteng.load_model()
    texts, meta = texts_and_labels()
    print(f"{len(texts)} prompts", flush=True)
    cache = record(model, texts)
    train_items = sorted(
        {m["item"] for m in meta if m["set"] == "wrapped" and m["split"] == "train"}
    )
    held = set(random.Random(0).sample(train_items, len(train_items) // 4))
    fit = [
        i
        for i, m in enumerate(meta)
        if (m["set"] == "own" and m["split"] == "train")
        or (m["set"] == "wrapped" and m["split"] == "train" and m["last"] and m["item"] not in held)
    ]
    y = torch.tensor([float(meta[i]["label"]) for i in fit], dtype=torch.float64)
    results = []
    for readout in READOUTS:
        for layers in LAYER_SETS:
            x = features(cache, readout, layers)
            w, b = fit_logistic(x[fit], y, l2=100.0, steps=200)
            row = {
                "readout": readout,
                "layers": layers,
                **measure((x @ w + b).tolist(), meta, held),
            }
            results.append(row)
            print(" ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    best = max(results, key=lambda r: r["wrapped_auroc"])
    print(f"best wrapped AUROC: {best['readout']} {best['layers']} {best['wrapped_auroc']}")
    print(f"written to {save('wrapped_readouts', {'results': results})}")


if __name__ == "__main__":
    main()

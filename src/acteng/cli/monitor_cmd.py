"""``acteng monitor``: per-token concept scores as a terminal heatmap or an HTML page."""

from __future__ import annotations

import argparse
import html
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from acteng.cli.common import add_model_args, check_writable, print_json, whole_number

if TYPE_CHECKING:
    from transformers import GenerationMixin


def register(sub: Any) -> None:
    p = sub.add_parser(
        "monitor",
        help="per-token concept scores of a prompt (and a reply)",
        description="Score every token along a concept vector and show a "
        "heatmap: red = more towards the concept than the text's "
        "median token, blue = less.",
    )
    p.add_argument("--vector", required=True, help=".safetensors file or library name")
    p.add_argument("--prompt", required=True)
    p.add_argument("--layers", default=None, help="layers to read (default: the vector's)")
    p.add_argument("--metric", default="projection", choices=["projection", "cosine"])
    p.add_argument(
        "--generate",
        type=whole_number(0),
        default=0,
        metavar="N",
        help="also generate N tokens (greedy) and score them",
    )
    p.add_argument(
        "--raw", action="store_true", help="score the prompt as raw text, not a chat turn"
    )
    p.add_argument("--html", default=None, metavar="FILE", help="write a self-contained page")
    p.add_argument("--json", action="store_true")
    add_model_args(p)
    p.set_defaults(run=run_monitor)


def colour_scale(scores: list[float]) -> tuple[float, float]:
    """(centre, scale): the text's median, and the 95th percentile of |score - median|.

    Raw projections share a large offset and the first token is often an outlier (an
    attention sink), so colours show each token relative to the rest of the text.
    """
    ordered = sorted(scores)
    centre = ordered[len(ordered) // 2]
    spread = sorted(abs(s - centre) for s in scores)
    scale = spread[min(len(spread) - 1, int(0.95 * len(spread)))] if spread else 0.0
    return centre, scale


def _shade(score: float, centre: float, scale: float) -> tuple[int, int, int]:
    """Red above the centre, blue below, white at it."""
    t = max(-1.0, min(1.0, (score - centre) / scale)) if scale > 0 else 0.0
    fade = int(255 * (1 - abs(t)))
    return (255, fade, fade) if t >= 0 else (fade, fade, 255)


def ansi_heatmap(tokens: list[str], scores: list[float]) -> str:
    centre, scale = colour_scale(scores)
    out = []
    for token, score in zip(tokens, scores, strict=True):
        r, g, b = _shade(score, centre, scale)
        out.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{token}\x1b[0m")
    return "".join(out)


def html_heatmap(tokens: list[str], scores: list[float], title: str) -> str:
    centre, scale = colour_scale(scores)
    spans = []
    for token, score in zip(tokens, scores, strict=True):
        r, g, b = _shade(score, centre, scale)
        text = html.escape(token).replace("\n", "&#x21b5;<br>")
        spans.append(f'<span style="background:rgb({r},{g},{b})" title="{score:.3f}">{text}</span>')
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>"
        f"{html.escape(title)}</title><style>body{{font-family:monospace;max-width:60em;"
        "margin:2em auto;line-height:1.8}span{padding:1px 0;white-space:pre-wrap}"
        ".key{margin-top:1em;color:#555}</style></head><body>"
        f"<h3>{html.escape(title)}</h3><div>{''.join(spans)}</div>"
        f"<p class='key'>red: more towards the concept than this text's median "
        f"({centre:.3g}), blue: less; full colour at ±{scale:.3g} "
        "(hover a token for its raw score)</p></body></html>\n"
    )


def run_monitor(args: argparse.Namespace) -> int:
    import torch

    from acteng.cli.common import load_model_from_args
    from acteng.library import load_vector
    from acteng.monitoring import monitor, score_tokens

    if args.html:
        check_writable(args.html)
    model = load_model_from_args(args)
    vector = load_vector(args.vector, model=model)
    layers = args.layers
    if args.generate > 0:
        text = args.prompt if args.raw else model.render_prompt(args.prompt)
        batch = model.tokenizer(text, return_tensors="pt", add_special_tokens=args.raw)
        with monitor(model, vector, layers=layers, metric=args.metric) as mon, torch.no_grad():
            out = cast("GenerationMixin", model.hf).generate(
                **batch.to(model.device),
                max_new_tokens=args.generate,
                do_sample=False,
                pad_token_id=model.tokenizer.pad_token_id,
            )
        ids = out[0].tolist()[:-1]  # the last new token was never fed back in
        tokens = [model.tokenizer.decode([t]) for t in ids]
        scores, per_layer = mon.aggregate(0), mon.scores(0)
    else:
        [result] = score_tokens(
            model, args.prompt, vector, layers=layers, metric=args.metric, chat=not args.raw
        )
        tokens, scores, per_layer = result.tokens, result.aggregate, result.per_layer
    if args.json:
        print_json(
            {
                "tokens": tokens,
                "aggregate": scores,
                "metric": args.metric,
                "per_layer": {str(k): v for k, v in per_layer.items()},
            }
        )
    elif sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        centre, _ = colour_scale(scores)
        print(ansi_heatmap(tokens, scores))
        print(f"(red above {centre:+.3f}, blue below; --json for the numbers)")
    else:  # a file or a pipe: no colour codes, one token and its score a line
        for token, score in zip(tokens, scores, strict=True):
            print(f"{score:+10.4f}  {token!r}")
    if args.html:
        title = f"{args.metric} on {args.vector} (layers {', '.join(map(str, per_layer))})"
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(html_heatmap(tokens, scores, title))
    return 0

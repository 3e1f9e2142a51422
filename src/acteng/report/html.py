"""The demo's report as one self-contained HTML file.

Figures are inline SVG (`acteng.report.export.figure_svg`) and the style sheet is inline,
so the file opens anywhere, offline, and can be mailed as is: no scripts, fonts or links to
fetch. Every piece of text from the model or the data is HTML-escaped.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

__all__ = ["render_report"]

_STYLE = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.figs svg { max-width: 100%; height: auto; border: 1px solid #eee; }
.gen td { width: 33%; font-size: 0.92em; white-space: pre-wrap; }
.note { color: #555; font-size: 0.92em; }
code { background: #f6f6f6; padding: 0 0.2em; }
"""


def _num(value: Any, fmt: str = "{:+.3f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return fmt.format(value)


def _pct(value: Any) -> str:
    return _num(None if value is None else 100 * value, "{:+.1f} %")


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{escape(c)}</td>' if i >= numeric_from else f"<td>{escape(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _figs(figures: dict[str, str], *names: str) -> str:
    return '<div class="figs">' + "".join(figures[n] for n in names if n in figures) + "</div>"


def _concept(name: str, c: dict[str, Any], figures: dict[str, str]) -> str:
    t, ev = c["tuned"], c["evaluation"]
    grid = t.get("grid_best") or {}
    tax, rel = ev["tax"], ev["reliability"]
    base = ev.get("baseline", {})
    parts = [
        f"<h2>{escape(name)}: {escape(c['description'])}</h2>",
        "<h3>Tuned setting</h3>",
        _table(
            ["setting", "method", "layers", "coefficient", "effect (nats)", "perplexity tax"],
            [
                [
                    "tuned",
                    t["method"],
                    str(t["layers"]),
                    _num(t["coefficient"], "{:g}"),
                    _num(t["effect"]),
                    _pct(t["tax"]),
                ],
                [
                    "best single-layer mean_diff grid point",
                    str(grid.get("method", "n/a")),
                    str(grid.get("layers", "n/a")),
                    _num(grid.get("coefficient"), "{:g}"),
                    _num(grid.get("effect")),
                    _pct(grid.get("tax")),
                ],
            ],
            numeric_from=3,
        ),
        '<p class="note">Effect: mean log-probability margin of the positive over the negative '
        f"answer on {t['selected_on']['size'] if t.get('selected_on') else '?'} held-out pairs, "
        "steered minus unsteered (the same pairs chose the setting, so it is an optimistic "
        "estimate of the winner). Tax: relative perplexity change on the bundled neutral "
        f"text; budget {100 * t['max_tax']:g} %.</p>",
        _figs(figures, f"frontier_{name}", f"tax_{name}"),
        "<h3>Answers, greedy decoding</h3>",
        '<table class="gen"><tr><th>prompt</th><th>unsteered</th><th>steered</th></tr>'
        + "".join(
            f"<tr><td>{escape(g['prompt'])}</td><td>{escape(g['unsteered'])}</td>"
            f"<td>{escape(g['steered'])}</td></tr>"
            for g in c["generations"]
        )
        + "</table>",
        "<h3>Alignment tax</h3>",
        _table(
            ["measure", "unsteered", "steered"],
            [
                [
                    "perplexity (neutral text)",
                    _num(tax["perplexity_unsteered"], "{:.2f}"),
                    _num(tax["perplexity_steered"], "{:.2f}"),
                ],
                [
                    "accuracy (general-knowledge questions)",
                    _num(tax["mc_accuracy_unsteered"], "{:.3f}"),
                    _num(tax["mc_accuracy_steered"], "{:.3f}"),
                ],
                ["next-token KL (nats)", "0", _num(tax["next_token_kl"], "{:.4f}")],
                [
                    "distinct-2 of answers",
                    _num(tax["distinct_2_unsteered"], "{:.3f}"),
                    _num(tax["distinct_2_steered"], "{:.3f}"),
                ],
            ],
        ),
        "<h3>Reliability and the prompting baseline</h3>",
        f"<p>Over {len(rel['slopes'])} held-out pairs: mean slope "
        f"{_num(rel['mean_slope'])} nats per unit coefficient, spread {_num(rel['spread'])}, "
        f"anti-steerable (slope below 0): {100 * rel['anti_steerable']:.0f} %.</p>",
        _table(
            ["condition", "mean margin (nats)", "shift vs nothing"],
            [
                [k, _num(v), _num(v - base["none"])]
                for k, v in base.items()
                if isinstance(v, (int, float))
            ],
        )
        + f'<p class="note">Prompt: system instruction "{escape(c["instruction"])}". '
        "Where the prompt alone moves the margin as much as steering, prompting is the "
        "cheaper tool.</p>",
        _figs(figures, f"slopes_{name}"),
        "<h3>What the vector promotes (logit lens)</h3>",
        _table(
            ["layer", "promotes", "suppresses"],
            [
                [
                    layer,
                    " ".join(repr(tok) for tok, _ in sides["promoted"]),
                    " ".join(repr(tok) for tok, _ in sides["suppressed"]),
                ]
                for layer, sides in c["vocab"].items()
            ],
            numeric_from=3,
        ),
    ]
    return "\n".join(parts)


def render_report(report: dict[str, Any], figures: dict[str, str]) -> str:
    """The HTML page for a demo report (see the module docstring); `figures` maps a
    figure's file stem to its SVG text (`acteng.report.export.figure_svg`)."""
    model = report["model"]
    det = report["detection"]
    summary_rows = []
    for name, c in report["concepts"].items():
        t, base = c["tuned"], c["evaluation"].get("baseline", {})
        summary_rows.append(
            [
                name,
                f"{t['method']} @ {t['layers']}, c={t['coefficient']:g}",
                _num(t["effect"]),
                _pct(t["tax"]),
                _num(base.get("prompt", math.nan) - base.get("none", math.nan)),
                _num(base.get("both", math.nan) - base.get("none", math.nan)),
            ]
        )
    body = [
        "<h1>acteng demo report</h1>",
        f"<p>Model <code>{escape(str(model['name']))}</code> ({model['num_layers']} layers, "
        f"width {model['hidden_size']}), acteng {escape(report['acteng'])}, "
        f"{escape(report['created'])}; total {report['timing']['total_s']:.0f} s. Greedy "
        "decoding; every number below is measured in this run.</p>",
        "<h2>Summary</h2>",
        _table(
            [
                "concept",
                "tuned setting",
                "effect (nats)",
                "perplexity tax",
                "prompt alone (nats)",
                "prompt + steering (nats)",
            ],
            summary_rows,
            numeric_from=2,
        ),
        *(_concept(name, c, figures) for name, c in report["concepts"].items()),
        "<h2>How the concepts relate, where they are readable</h2>",
        _figs(figures, "readability", "cosines", "scatter"),
        '<p class="note">Readability: a logistic probe per layer trained on the train split '
        "and scored on the test split (AUROC 0.5 = chance). Cosines: between the concepts' "
        "mean-difference directions at each layer. Scatter: the first two principal "
        "components of positive and negative held-out activations.</p>",
        "<h2>Detection</h2>",
        _table(
            ["detector", "AUROC", "harmful flagged", "harmless flagged", "held-out pairs"],
            [
                [
                    det["detector"],
                    _num(det["auroc"], "{:.3f}"),
                    _num(100 * det["harmful_flagged"], "{:.1f} %"),
                    _num(100 * det["harmless_flagged"], "{:.1f} %"),
                    str(det["data"]["size"]),
                ]
            ],
        ),
        "<h2>Timing</h2>",
        _table(
            ["step", "seconds"],
            [[k, f"{v:.1f}"] for k, v in report["timing"]["steps_s"].items()],
        ),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>acteng demo report</title>"
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )

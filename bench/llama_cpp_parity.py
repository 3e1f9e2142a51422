"""Does an exported vector steer llama.cpp like acteng steers transformers? (issue 6)

For several layers L: correlation between llama.cpp's change in next-token logits with the
exported control vector and acteng's change with the same direction at layer L-1, L, L+1
(the same SmolLM2 GGUF file in both engines). Floor: >= 0.95 at L, and higher than at L+-1.

    .venv/bin/python bench/llama_cpp_parity.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.llama_cpp_parity import logit_change_correlations

import acteng
from _common import save


def main() -> None:
    model = acteng.load_model()
    vector = acteng.extract(model, "sentiment", layers="all")
    prompts = ["Tell me about your weekend.", "What do you think of rainy days?"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layer in (5, 10, 15, 20, 25):
            for prompt in prompts:
                corr = logit_change_correlations(model, vector, layer, 4.0, prompt, Path(tmp))
                rows.append(
                    {"layer": layer, "prompt": prompt, **{str(k): v for k, v in corr.items()}}
                )
                print(
                    f"layer {layer:>2}  L-1 {corr[-1]:.4f}  L {corr[0]:.4f}  L+1 {corr[1]:.4f}"
                    f"   ({prompt})"
                )
    path = save("llama_cpp_parity", {"coefficient": 4.0, "rows": rows})
    print(f"floor: >= 0.95 at L and above L+-1; written to {path}")


if __name__ == "__main__":
    main()

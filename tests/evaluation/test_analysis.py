"""Analysis: logit lens of vectors, readability per layer, cosines, PCA scatter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import acteng
from acteng.errors import ConfigError
from acteng.evaluation.analysis import (
    layer_cosines,
    pca_scatter,
    readability,
    vector_cosines,
    vocab_projection,
)
from tests.helpers import random_vector


def test_vocab_projection_is_norm_then_unembed(tiny_llama: acteng.Model) -> None:
    vector = random_vector(tiny_llama, [1, 3])
    result = vocab_projection(tiny_llama, vector, k=5)
    hf = tiny_llama.hf
    with torch.no_grad():
        logits = hf.lm_head(hf.model.norm(vector[3][None, None])).double()[0, 0]
    logits -= logits.mean()
    top = torch.topk(logits, 5)
    assert [s for _, s in result[3]["promoted"]] == pytest.approx(top.values.tolist())
    assert result[3]["promoted"][0][0] == tiny_llama.tokenizer.decode([int(top.indices[0])])
    assert [s for _, s in result[1]["suppressed"]] == sorted(
        (s for _, s in result[1]["suppressed"])
    )


def test_cosines_and_scatter(tiny_llama: acteng.Model) -> None:
    a, b = random_vector(tiny_llama, [0, 1, 2], seed=1), random_vector(tiny_llama, [1], seed=2)
    matrix = layer_cosines(a)
    assert len(matrix) == 3 and matrix[0][0] == pytest.approx(1.0)
    assert matrix[0][2] == pytest.approx(matrix[2][0])
    pair = vector_cosines({"a": a, "b": b}, 1)
    assert pair[0][1] == pytest.approx(float(torch.cosine_similarity(a[1], b[1], dim=0)), abs=1e-6)
    with pytest.raises(ConfigError, match="no layer 0"):
        vector_cosines({"a": a, "b": b}, 0)
    scatter = pca_scatter(tiny_llama, acteng.load_pairs("sentiment")[:6], 2)
    assert len(scatter["positive"]) == 6 and len(scatter["negative"][0]) == 2


@pytest.mark.real
def test_analysis_on_the_real_model(smollm2: acteng.Model) -> None:
    vector = acteng.extract(smollm2, "sentiment", layers=[24])
    lens = vocab_projection(smollm2, vector, k=10)[24]
    promoted = " ".join(t.lower() for t, _ in lens["promoted"])
    suppressed = " ".join(t.lower() for t, _ in lens["suppressed"])
    assert "excellent" in promoted or "enjoy" in promoted, promoted
    assert "worse" in suppressed, suppressed
    rows = readability(smollm2, "sentiment", [2, 16])
    assert rows[1]["auroc"] > 0.95 and rows[1]["auroc"] >= rows[0]["auroc"], rows
    with pytest.raises(ConfigError, match="test split"):
        readability(smollm2, acteng.load_pairs("sentiment", split="train"), [2])


@pytest.mark.real
def test_analyze_cli(
    smollm2: acteng.Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from acteng.cli import main

    path = acteng.extract(smollm2, "sentiment", layers=[16, 24]).save(tmp_path / "s.safetensors")
    args = ["analyze", str(path), "--pairs", "sentiment", "--layers", "16", "--scatter-layer"]
    plots = tmp_path / "plots"
    assert main([*args, "16", "--top", "3", "--plots", str(plots), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = ["layer_cosines.svg", "readability.svg", "scatter.svg"]
    assert report["plots"] == [str(plots / n) for n in names]
    assert sorted(p.name for p in plots.iterdir()) == names
    assert set(report["vocab"]) == {"16", "24"} and len(report["vocab"]["24"]["promoted"]) == 3
    assert report["readability"][0]["layer"] == 16 and len(report["layer_cosines"]) == 2
    assert len(report["scatter"]["positive"][0]) == 2
    assert main(["analyze", str(path), "--scatter-layer", "3"]) == 2
    assert "needs --pairs" in capsys.readouterr().err

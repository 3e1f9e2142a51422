"""extract: every method on every layout, and exact mean differences."""

from collections.abc import Callable

import pytest
import torch

import acteng
from acteng.errors import ConfigError, DataError
from acteng.methods import METHODS
from tests.helpers import FAMILIES

PAIRS = [
    ("I love this film, it is wonderful.", "I hate this film, it is awful."),
    ("What a great day.", "What a terrible day."),
    ("The food was delicious.", "The food was disgusting."),
    ("She is kind and warm.", "She is cruel and cold."),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_every_layout(
    family: str, method: str, make_tiny: Callable[[str], acteng.Model]
) -> None:
    model = make_tiny(family)
    pairs = PAIRS[:1] if method == "actadd" else PAIRS
    vector = acteng.extract(model, pairs, method=method, layers="all", position="mean")
    assert vector.layers == (0, 1, 2, 3)
    assert vector.metadata["method"] == method
    mean_diff = acteng.extract(model, pairs, method="mean_diff", layers="all", position="mean")
    for layer in vector.layers:
        v = vector[layer]
        assert torch.isfinite(v).all() and v.norm() > 0
        # every method points from negative to positive like the mean difference
        assert torch.dot(v, mean_diff[layer]) > 0


def test_mean_diff_is_exact(tiny_llama: acteng.Model) -> None:
    vector = acteng.extract(tiny_llama, PAIRS, layers=[0, 2], position="last")
    for layer in (0, 2):
        pos, neg = [], []
        for p, n in PAIRS:
            for text, bucket in ((p, pos), (n, neg)):
                ids = tiny_llama.tokenizer(text, return_tensors="pt")
                with torch.no_grad():
                    hs = tiny_llama.hf(**ids, output_hidden_states=True).hidden_states
                bucket.append(hs[layer + 1][0, -1].double())
        expected = torch.stack(pos).mean(0) - torch.stack(neg).mean(0)
        cosine = torch.nn.functional.cosine_similarity(vector[layer].double(), expected, dim=0)
        assert cosine >= 0.9999
        torch.testing.assert_close(vector[layer].double(), expected, atol=1e-5, rtol=1e-4)


def test_batched_equals_one_by_one(tiny_llama: acteng.Model) -> None:
    batched = acteng.extract(tiny_llama, PAIRS, layers="all", batch_size=8)
    single = acteng.extract(tiny_llama, PAIRS, layers="all", batch_size=1)
    for layer in batched.layers:
        torch.testing.assert_close(batched[layer], single[layer], atol=1e-5, rtol=1e-4)


def test_pca_and_probe_scale_to_mean_diff(tiny_llama: acteng.Model) -> None:
    md = acteng.extract(tiny_llama, PAIRS, layers=[2])[2].double()
    for method in ("pca", "probe"):
        v = acteng.extract(tiny_llama, PAIRS, method=method, layers=[2])[2].double()
        unit = v / v.norm()
        assert torch.isclose(v.norm(), torch.dot(md, unit), rtol=1e-5)


def test_unit_normalize(tiny_llama: acteng.Model) -> None:
    v = acteng.extract(tiny_llama, PAIRS, layers=[1], normalize="unit")
    assert torch.isclose(v[1].norm(), torch.tensor(1.0))
    assert v.metadata["normalize"] == "unit"


def test_errors(tiny_llama: acteng.Model) -> None:
    with pytest.raises(ConfigError, match="actadd takes exactly one pair, got 4"):
        acteng.extract(tiny_llama, PAIRS, method="actadd")
    with pytest.raises(ConfigError, match="unknown method 'lda'"):
        acteng.extract(tiny_llama, PAIRS, method="lda")
    with pytest.raises(DataError, match="empty"):
        acteng.extract(tiny_llama, [])
    with pytest.raises(ConfigError, match="out of range"):
        acteng.extract(tiny_llama, PAIRS, layers=[9])

"""acteng on transformers vs llama.cpp on the same GGUF file: the change in logits.

Shared by tests/test_llama_cpp.py and bench/llama_cpp_parity.py. A vector is exported with
`acteng.export_gguf`, read back the way llama.cpp's `common_control_vector_load` reads it
(``direction.{n}`` -> buffer slot n - 1, i.e. the output of block n) and applied with
`llama_set_adapter_cvec`; acteng applies the same direction at layer L + offset.

llama-cpp-python 0.3.36 built natively on an AVX-512/AMX machine crashed on multi-token
batches, so llama.cpp evaluates one token at a time (n_batch=1): same logits, slower.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch

import acteng
from acteng.models import BUNDLED_MODELS


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def logit_change_correlations(
    model: acteng.Model,
    vector: acteng.SteeringVector,
    layer: int,
    coefficient: float,
    prompt: str,
    workdir: Path,
) -> dict[int, float]:
    """Correlation of llama.cpp's logit change (vector at `layer`) with acteng's at layer
    + offset, for offsets -1, 0, +1."""
    import llama_cpp
    from gguf import GGUFReader

    path = acteng.export_gguf(vector.select([layer]), workdir / f"layer{layer}.gguf")
    reader = GGUFReader(str(path))
    n_embd, n_layer = model.hidden_size, model.num_layers
    buffer = np.zeros(n_embd * (n_layer - 1), np.float32)
    for tensor in reader.tensors:  # as llama.cpp's common_control_vector_load does
        n = int(tensor.name.split(".")[1])
        buffer[n_embd * (n - 1) : n_embd * n] += coefficient * np.asarray(tensor.data)

    ids = model.tokenizer(model.render_prompt(prompt), add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(
        model_path=str(BUNDLED_MODELS["smollm2-135m"]()),
        n_ctx=512,
        n_batch=1,
        n_threads=2,
        logits_all=True,
        verbose=False,
    )

    def llama_logits(data: np.ndarray | None) -> torch.Tensor:
        llm.reset()
        if data is None:
            code = llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, n_embd, -1, -1)
        else:
            pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            code = llama_cpp.llama_set_adapter_cvec(
                llm.ctx, pointer, data.size, n_embd, 1, n_layer - 1
            )
        assert code == 0, f"llama_set_adapter_cvec returned {code}"
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[len(ids) - 1]), dtype=torch.float64)

    def acteng_logits(at: int | None) -> torch.Tensor:
        tokens = torch.tensor([ids])
        with torch.no_grad():
            if at is None:
                return model.hf(tokens).logits[0, -1].double()
            moved = acteng.SteeringVector({at: vector[layer]})
            with acteng.steer(model, moved, coefficient=coefficient):
                return model.hf(tokens).logits[0, -1].double()

    try:
        llama_change = llama_logits(buffer) - llama_logits(None)
    finally:
        llm.close()
    base = acteng_logits(None)
    return {
        offset: _corr(acteng_logits(layer + offset) - base, llama_change) for offset in (-1, 0, 1)
    }

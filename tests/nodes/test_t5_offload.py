"""The T5 under ComfyUI's model management: the embedding cache spares loading it again, and a quantized T5 survives
offload cycles as one copy."""
from __future__ import annotations

import pytest

from harness.graphs import graph


def _t5_loaded(comfy) -> int:
    import comfy.model_management as mm

    return sum(1 for m in mm.current_loaded_models
               if m.model is not None and type(getattr(m.model.model, "inner", None)).__name__ == "T5EncoderModel")


def test_embedding_cache_avoids_loading_t5_again(executor, comfy):
    import comfy.model_management as mm

    assert executor.run(graph(positive="a castle", seed=1))["ok"]
    assert executor.run(graph(positive="a boat", seed=1))["ok"]
    mm.unload_all_models()
    assert _t5_loaded(comfy) == 0
    again = executor.run(graph(positive="a castle", seed=1, steps=4))  # encode node runs; its prompts are cached
    assert again["ok"], again["error"]
    assert "2" not in next(d["nodes"] for e, d in again["messages"] if e == "execution_cached")
    assert _t5_loaded(comfy) == 0


@pytest.mark.parametrize("quant", ["8-bit (bitsandbytes)", "4-bit nf4 (bitsandbytes)"])  # the loader's labels
def test_quantized_t5_survives_offload_cycles_in_model_management(executor, comfy, quant):
    import comfy.model_management as mm

    from harness.comfyui import clear_embeddings

    for i in range(3):
        clear_embeddings(comfy)
        result = executor.run(graph(quant=quant, positive=f"a tower number {i}", seed=i))
        assert result["ok"], result["error"]
        assert _t5_loaded(comfy) == 1  # one copy, loaded by model management
        mm.unload_all_models()  # offload everything, as ComfyUI does under memory pressure
        assert _t5_loaded(comfy) == 0

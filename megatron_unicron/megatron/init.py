"""Layout-independent initialization: the same weights whatever the TP/PP/DP layout.

Megatron initializes each pipeline stage from ``seed + 100·pp_rank`` and draws the layers' weights one
after another from that stream, so a model built at PP 2 starts from other weights than at PP 1. Here
every transformer layer, the embedding and the output layer draw from a generator seeded by the job's
seed and their *global* position (layer number, "embedding", "output layer"). With CPU initialization
(megatron creates each full weight, then keeps its TP slice) the initial model is then identical for
every layout, so runs at different layouts can be compared, and a job that changes its layout keeps
meaning the same model.

The patch is active only while a model is built (:func:`layout_independent`), and the default generator
is restored afterwards, so training-time randomness (dropout) is Megatron's as usual.
"""

from __future__ import annotations

import contextlib
import functools
import zlib
from collections.abc import Iterator
from typing import Any

import torch

from megatron_unicron.megatron.patching import PatchSet, PatchSite

SITES: tuple[PatchSite, ...] = (
    PatchSite("megatron.core.transformer.transformer_layer:TransformerLayer", "__init__", "seed per layer"),
    PatchSite(
        "megatron.core.models.common.embeddings.language_model_embedding:LanguageModelEmbedding",
        "__init__",
        "seed of the embeddings",
    ),
    PatchSite("megatron.core.transformer.transformer_block:TransformerBlock", "__init__", "seed of the head"),
)


def component_seed(seed: int, component: str) -> int:
    """A seed for one part of the model, stable across processes and layouts."""
    return zlib.crc32(f"{seed}/{component}".encode())


@contextlib.contextmanager
def layout_independent(seed: int) -> Iterator[None]:
    """Build models inside this block to initialize them independently of the layout."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

    patches = PatchSet("megatron_unicron layout-independent initialization")
    layer_init = TransformerLayer.__init__
    embedding_init = LanguageModelEmbedding.__init__
    block_init = TransformerBlock.__init__

    @functools.wraps(layer_init)
    def layer(
        self: Any, config: Any, submodules: Any, layer_number: int = 1, *args: Any, **kwargs: Any
    ) -> None:
        vp_stage = kwargs.get("vp_stage")
        offset = get_transformer_layer_offset(
            config, vp_stage, parallel_state.get_pipeline_model_parallel_rank()
        )
        torch.manual_seed(component_seed(seed, f"layer {layer_number + offset}"))
        layer_init(self, config, submodules, layer_number, *args, **kwargs)

    @functools.wraps(embedding_init)
    def embedding(self: Any, *args: Any, **kwargs: Any) -> None:
        torch.manual_seed(component_seed(seed, "embedding"))
        embedding_init(self, *args, **kwargs)

    @functools.wraps(block_init)
    def block(self: Any, *args: Any, **kwargs: Any) -> None:
        block_init(self, *args, **kwargs)
        torch.manual_seed(component_seed(seed, "output layer"))  # the output layer is built next

    state = torch.get_rng_state()
    patches.replace(TransformerLayer, "__init__", layer)
    patches.replace(LanguageModelEmbedding, "__init__", embedding)
    patches.replace(TransformerBlock, "__init__", block)
    try:
        yield
    finally:
        patches.revert()
        torch.set_rng_state(state)

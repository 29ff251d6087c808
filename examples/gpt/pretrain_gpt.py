"""Pretrain GPT on megatron-core with Megatron-LM's flags (or ``--yaml-cfg``); self-healing with --unicron.

Run it through the project's launcher, e.g. the tiny CPU demo at TP2 PP2 on 4 ranks::

    unicron-run --nproc-per-node 4 examples/gpt/pretrain_gpt.py --yaml-cfg examples/gpt/configs/tiny_gpt.yaml

``get_batch``, ``loss_func`` and ``forward_step`` are those of Megatron-LM's ``pretrain_gpt.py``: edit
them here to change what a step computes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

try:
    from megatron_unicron.megatron.pretrain import pretrain
except ImportError:  # running from a source checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from megatron_unicron.megatron.pretrain import pretrain


def get_batch(data_iterator: Iterator[dict[str, Any]] | None) -> tuple[Any, ...]:
    """This rank's next micro-batch (None on middle pipeline stages, which receive activations)."""
    if data_iterator is None:
        return None, None, None, None, None
    batch = next(data_iterator)
    return (
        batch["tokens"],
        batch["labels"],
        batch["loss_mask"],
        batch.get("attention_mask"),
        batch["position_ids"],
    )


def loss_func(
    loss_mask: torch.Tensor, output_tensor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Summed token loss, the number of tokens, and the pair reported as ``lm loss``."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    return loss, num_tokens, report


def forward_step(
    data_iterator: Iterator[dict[str, Any]] | None, model: Any
) -> tuple[torch.Tensor, Callable[..., Any]]:
    """Forward one micro-batch; the schedule calls the returned loss function on the output."""
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output_tensor, partial(loss_func, loss_mask)


if __name__ == "__main__":  # megatron's checkpoint writers re-import this module in helper processes
    sys.exit(pretrain(forward_step))

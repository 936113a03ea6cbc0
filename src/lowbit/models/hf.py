"""Hugging Face encoders: quantized attention matmuls, block names for feature distillation, small BERTs.

``transformers`` is optional (``pip install 'lowbit[hf]'``) and imported only when one of these runs.

How the two attention matmuls get quantized: each self-attention block (``query``/``key``/``value`` Linear
children and a ``config``) gets two :class:`~lowbit.quant.modules.QuantMatmul` children, ``qk_matmul`` and
``pv_matmul``, and the model's config switches to the attention implementation ``"lowbit"``, which this module
registers with Hugging Face's ``AttentionInterface`` (and its mask twin, with the eager additive mask). That
function is the eager attention with the two ``torch.matmul`` calls replaced by the block's QuantMatmuls. It is
the extension point transformers documents for custom attention, so the model's own ``forward`` is untouched
and no source is patched; SDPA and flash kernels cannot be used because they never expose the two products.
Blocks without QuantMatmuls (cross-attention, layers left float) run the plain eager attention.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import LowbitError
from lowbit.quant.config import QuantConfig
from lowbit.quant.modules import QuantMatmul
from lowbit.quant.plan import Plan, block_stacks, is_attention

ATTN_IMPLEMENTATION = "lowbit"


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise LowbitError("this needs Hugging Face transformers: pip install 'lowbit[hf]'") from None
    return transformers


def attention_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Self-attention blocks by name (those with Linear query/key/value children)."""
    return {name: m for name, m in model.named_modules() if is_attention(m)}


def encoder_blocks(model: nn.Module) -> list[str]:
    """Names of the transformer blocks (``bert.encoder.layer.0`` ...): the features to distil with
    ``FitConfig(distill_features=...)``."""
    return [f"{stack}.{i}" for stack in block_stacks(model) for i in range(len(model.get_submodule(stack)))]


def _register() -> None:
    """Make ``"lowbit"`` a known attention implementation (idempotent)."""
    transformers = require_transformers()
    interface = getattr(transformers, "AttentionInterface", None)
    masks = getattr(transformers, "AttentionMaskInterface", None)
    if interface is None or masks is None:
        raise LowbitError(f"quantized attention matmuls need transformers >= 5 (found {transformers.__version__}), "
                          "whose attention goes through AttentionInterface: pip install 'lowbit[hf]'")
    if ATTN_IMPLEMENTATION not in interface._global_mapping:
        interface.register(ATTN_IMPLEMENTATION, lowbit_attention)
        masks.register(ATTN_IMPLEMENTATION, masks._global_mapping["eager"])


def lowbit_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention, ``softmax(Q·Kᵀ·scaling + mask)·V`` on ``[B, heads, T, d]``, through the block's
    QuantMatmuls when it has them. Returns ``([B, T, heads, d], probabilities)`` as transformers expects."""
    qk = getattr(module, "qk_matmul", None)
    pv = getattr(module, "pv_matmul", None)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    key_t = key.transpose(2, 3)
    scores = torch.matmul(query, key_t) if qk is None else qk(query, key_t)
    scores = scores * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = F.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value) if pv is None else pv(probs, value)
    return out.transpose(1, 2).contiguous(), probs


def use_eager_attention_(model: nn.Module) -> bool:
    """Switch a Hugging Face model from SDPA/flash to the eager attention maths; True if it changed.

    ``quantize_`` does this for every HF transformer it quantizes: the fused CPU kernels have no second
    derivative, which the Hessian sensitivity needs, and eager is what quantized matmuls build on, so a model
    scores the same with and without them until their quantizers start rounding.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) in ("eager", ATTN_IMPLEMENTATION):
        return False
    config._attn_implementation = "eager"
    for m in model.modules():  # blocks normally share the model's config; a copied one is switched too
        sub = getattr(m, "config", None)
        if sub is not None and sub is not config and hasattr(sub, "_attn_implementation"):
            sub._attn_implementation = "eager"
    return True


def quantize_matmuls_(model: nn.Module, plan: Plan, cfg: QuantConfig) -> dict[str, QuantMatmul]:
    """Give every self-attention block whose ``query`` the plan quantizes two QuantMatmuls at its input bits.

    Returns the new QuantMatmuls by name. The blocks must belong to a Hugging Face model whose attention goes
    through ``AttentionInterface`` (module docstring); anything else is one error naming the block.
    """
    added = {}
    for name, block in attention_blocks(model).items():
        query = f"{name}.query" if name else "query"
        bits = plan.layers.get(query, (None, None))[1]
        if bits is None:
            continue
        config = getattr(block, "config", None)
        source = sys.modules.get(type(block).__module__)
        if config is None or not hasattr(source, "ALL_ATTENTION_FUNCTIONS"):
            raise LowbitError(f"cannot quantize the attention matmuls of {name or 'the model'} "
                              f"({type(block).__name__}): only Hugging Face attention that dispatches through "
                              "AttentionInterface is supported; set QuantConfig(quantize_matmuls=False)")
        _register()
        for child in ("qk_matmul", "pv_matmul"):
            if hasattr(block, child):
                raise LowbitError(f"{name}.{child} exists already: the attention matmuls are quantized")
            qm = QuantMatmul(bits, bits, cfg)
            block.add_module(child, qm)
            added[f"{name}.{child}"] = qm
        config._attn_implementation = ATTN_IMPLEMENTATION
    model_config = getattr(model, "config", None)
    if added and model_config is not None:  # the model builds its mask by this name too
        model_config._attn_implementation = ATTN_IMPLEMENTATION
    return added


def tiny_bert(num_labels: int = 2, vocab_size: int = 64, hidden_size: int = 32, num_hidden_layers: int = 2,
              num_attention_heads: int = 2, intermediate_size: int = 64, max_position_embeddings: int = 64,
              dropout: float = 0.0, seed: int | None = None) -> nn.Module:
    """A ``BertForSequenceClassification`` from a ``BertConfig`` with random init: nothing is downloaded."""
    transformers = require_transformers()
    if seed is not None:
        torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                                     num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                                     intermediate_size=intermediate_size,
                                     max_position_embeddings=max_position_embeddings, num_labels=num_labels,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return transformers.BertForSequenceClassification(config)


__all__ = ["ATTN_IMPLEMENTATION", "attention_blocks", "encoder_blocks", "lowbit_attention", "quantize_matmuls_",
           "tiny_bert", "use_eager_attention_"]

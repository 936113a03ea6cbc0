"""QuantConv2d and QuantLinear: drop-in subclasses that fake-quantize their input and weight; QuantMatmul for
products of two activations (attention).

They subclass ``nn.Conv2d`` / ``nn.Linear`` so ``isinstance`` checks in user code (weight init, BN
folding, parameter grouping) keep working, and they reuse the float layer's own ``weight`` and ``bias``
Parameters. Precision applies to the weight and to the layer's *input* activation (LSQ convention);
a tensor with ``bits=None`` stays float and simply has no quantizer.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.quant.config import QuantConfig
from lowbit.quant.quantizers import (
    FAQ_PERCENTILE,
    FAQ_STD_MULTIPLE,
    FaqQuantizer,
    LsqQuantizer,
    MinMaxQuantizer,
    _Quantizer,
)


def make_quantizer(cfg: QuantConfig, bits: int, role: str, signed: bool | None) -> _Quantizer:
    """Build an uninitialised quantizer of ``cfg.method`` for a weight or an input activation."""
    per_channel = cfg.per_channel and role == "weight"
    if cfg.method == "lsq":
        return LsqQuantizer(bits, signed, per_channel, 0, role=role, init=cfg.activation_init)
    if cfg.method == "faq":
        pct = {**FAQ_PERCENTILE, **(cfg.faq_percentiles or {})}.get(bits)
        k = {**FAQ_STD_MULTIPLE, **(cfg.faq_weight_std_multiple or {})}.get(bits)
        return FaqQuantizer(bits, signed, per_channel, 0, role=role, percentile=pct, std_multiple=k,
                            power_of_two=cfg.faq_power_of_two)
    return MinMaxQuantizer(bits, signed, per_channel, 0, role=role, mse=cfg.minmax_mse)


class _QuantLayer:
    """What QuantConv2d and QuantLinear share: the two quantizers and their construction."""

    weight: nn.Parameter
    weight_quantizer: _Quantizer | None
    input_quantizer: _Quantizer | None
    quant_config: QuantConfig

    @property
    def w_bits(self) -> int | None:
        return None if self.weight_quantizer is None else self.weight_quantizer.bits

    @property
    def a_bits(self) -> int | None:
        return None if self.input_quantizer is None else self.input_quantizer.bits

    @property
    def shares_input(self) -> bool:
        """Whether the input quantizer is a QuantAct's (:meth:`share_input_quantizer_`): held, not registered."""
        return "input_quantizer" in self.__dict__

    def share_input_quantizer_(self, act: QuantAct) -> None:
        """Read ``act``'s codes as they are: its quantizer becomes this layer's input quantizer and the layer
        does not round its input again, as an integer backend reads the codes without requantizing them.

        The layer must read nothing but ``act``'s output. The quantizer stays registered under ``act`` only, so
        the state dict holds its step once (a checkpoint with a step of the layer's own does not load)."""
        if act.bits != self.a_bits:
            raise LowbitError(f"a layer at {self.a_bits} input bits cannot read {act.bits}-bit codes unrounded")
        self._modules.pop("input_quantizer", None)
        object.__setattr__(self, "input_quantizer", act.input_quantizer)  # not a child: nn.Module would register it

    def own_input_quantizer_(self) -> None:
        """Undo :meth:`share_input_quantizer_`: a fresh, uninitialised input quantizer of this layer's own at the
        same bits and signedness (e.g. to load a checkpoint whose layer had a step of its own)."""
        shared = self.__dict__.pop("input_quantizer")
        q = make_quantizer(self.quant_config, shared.bits, "activation", signed=shared.signed)
        self.register_module("input_quantizer", q.to(device=self.weight.device, dtype=self.weight.dtype))

    @property
    def method(self) -> str:
        return self.quant_config.method

    def set_quantizers_(self, w_bits: int | None, a_bits: int | None,
                        input_signed: bool | None = None) -> None:
        """Replace both quantizers by fresh, uninitialised ones (new Parameters: rebuild the optimizer).

        ``input_signed`` fixes the input quantizer's signedness; None falls back to the config.
        A layer that reads a QuantAct's codes at ``a_bits`` keeps that quantizer (the stream's, not its own);
        at other bits it gets one of its own again.
        """
        cfg = self.quant_config
        if input_signed is None:
            input_signed = cfg.input_signed
        keep = self.shares_input and a_bits == self.a_bits
        if self.shares_input and not keep:
            del self.__dict__["input_quantizer"]
        wq = None if w_bits is None else make_quantizer(cfg, w_bits, "weight", signed=True)
        aq = None if a_bits is None else make_quantizer(cfg, a_bits, "activation", signed=input_signed)
        for name, q in (("weight_quantizer", wq), ("input_quantizer", aq)):
            if name == "input_quantizer" and keep:
                continue
            if q is not None:
                q.to(device=self.weight.device, dtype=self.weight.dtype)
            self.register_module(name, q)

    def _setup(self, module: nn.Module, w_bits: int | None, a_bits: int | None, method: str | None,
               cfg: QuantConfig | None) -> None:
        cfg = cfg or QuantConfig()
        if method is not None and method != cfg.method:
            cfg = dataclasses.replace(cfg, method=method)
        self.quant_config = cfg
        self.weight = module.weight
        self.bias = module.bias
        self.set_quantizers_(w_bits, a_bits)
        self.train(module.training)

    def _quantized_operands(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_hat = x if self.input_quantizer is None or self.shares_input else self.input_quantizer(x)
        w_hat = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return x_hat, w_hat

    def _bits_repr(self) -> str:
        return f"w_bits={self.w_bits}, a_bits={self.a_bits}, method={self.method}"


class QuantConv2d(_QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` computing ``conv(Q_a(x), Q_w(W)) + b`` with the original stride/padding/groups."""

    @classmethod
    def from_float(cls, module: nn.Conv2d, w_bits: int | None, a_bits: int | None, method: str | None = None,
                   cfg: QuantConfig | None = None) -> QuantConv2d:
        """Wrap ``module``'s own weight and bias Parameters; ``method`` overrides ``cfg.method``."""
        if not isinstance(module, nn.Conv2d):
            raise LowbitError(f"QuantConv2d.from_float needs an nn.Conv2d, got {type(module).__name__}")
        new = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                  padding=module.padding, dilation=module.dilation, groups=module.groups,
                  bias=module.bias is not None, padding_mode=module.padding_mode, device="meta")
        new._setup(module, w_bits, a_bits, method, cfg)
        return new

    def forward(self, x: Tensor) -> Tensor:
        x_hat, w_hat = self._quantized_operands(x)
        return self._conv_forward(x_hat, w_hat, self.bias)  # handles padding_mode like nn.Conv2d

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._bits_repr()}"


class QuantLinear(_QuantLayer, nn.Linear):
    """``nn.Linear`` computing ``Q_a(x) @ Q_w(W).T + b``; inputs of any leading shape ``[..., in]``."""

    @classmethod
    def from_float(cls, module: nn.Linear, w_bits: int | None, a_bits: int | None, method: str | None = None,
                   cfg: QuantConfig | None = None) -> QuantLinear:
        """Wrap ``module``'s own weight and bias Parameters; ``method`` overrides ``cfg.method``."""
        if not isinstance(module, nn.Linear):
            raise LowbitError(f"QuantLinear.from_float needs an nn.Linear, got {type(module).__name__}")
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        new._setup(module, w_bits, a_bits, method, cfg)
        return new

    def forward(self, x: Tensor) -> Tensor:
        x_hat, w_hat = self._quantized_operands(x)
        return F.linear(x_hat, w_hat, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._bits_repr()}"


class QuantMatmul(nn.Module):
    """``Q_a(a) @ Q_b(b)``: a product of two activations, e.g. attention's Q·Kᵀ and softmax(·)·V.

    Neither operand is a weight, so both get an input quantizer of ``cfg.method`` (LSQ: a learned step each,
    gradient-scaled by the features per example). Signedness is detected at calibration as for layer inputs:
    Q, K and V come out signed, the softmax probabilities unsigned, which gives them all 2^b levels of [0, 1].
    ``bits=None`` leaves that operand float.
    """

    def __init__(self, a_bits: int | None, b_bits: int | None, cfg: QuantConfig | None = None):
        super().__init__()
        self.quant_config = cfg or QuantConfig()
        self.set_quantizers_(a_bits, b_bits)

    def set_quantizers_(self, a_bits: int | None, b_bits: int | None) -> None:
        """Fresh, uninitialised quantizers for both operands (new Parameters: rebuild the optimizer)."""
        cfg = self.quant_config
        for name, bits in (("a_quantizer", a_bits), ("b_quantizer", b_bits)):
            q = None if bits is None else make_quantizer(cfg, bits, "activation", signed=cfg.input_signed)
            self.register_module(name, q)

    @property
    def quantizers(self) -> list[_Quantizer]:
        return [q for q in (self.a_quantizer, self.b_quantizer) if q is not None]

    @property
    def bits(self) -> tuple[int | None, int | None]:
        return tuple(None if q is None else q.bits for q in (self.a_quantizer, self.b_quantizer))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a_hat = a if self.a_quantizer is None else self.a_quantizer(a)
        b_hat = b if self.b_quantizer is None else self.b_quantizer(b)
        return torch.matmul(a_hat, b_hat)

    def extra_repr(self) -> str:
        a, b = self.bits
        return f"a_bits={a}, b_bits={b}, method={self.quant_config.method}"


class QuantAct(nn.Module):
    """``Q_a(x)``: fake-quantizes an activation that no layer's own input quantizer covers, e.g. the residual
    stream after ``relu(branch + shortcut)`` (``QuantConfig.residual_bits``), so that an integer backend can
    carry it as narrow codes, as PyTorch's own int8 models do, instead of a wide int32 value.

    The quantizer is called ``input_quantizer`` as in the quantized layers: exporters read its codes the
    same way. Readers that quantize again (a conv's 4-bit input quantizer) round the codes a second time,
    exactly as the fake-quant model does.
    """

    def __init__(self, bits: int, cfg: QuantConfig | None = None):
        super().__init__()
        cfg = self.quant_config = cfg or QuantConfig()
        self.input_quantizer = make_quantizer(cfg, bits, "activation", signed=cfg.input_signed)

    @property
    def bits(self) -> int:
        return self.input_quantizer.bits

    def forward(self, x: Tensor) -> Tensor:
        return self.input_quantizer(x)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, method={self.quant_config.method}"


QUANT_LAYERS = (QuantConv2d, QuantLinear)

__all__ = ["QUANT_LAYERS", "QuantAct", "QuantConv2d", "QuantLinear", "QuantMatmul", "make_quantizer"]

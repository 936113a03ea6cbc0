"""verify() with the fast backend: 0 differing integer logits on an export, and the report says so with the
layer paths."""

import pytest
import torch

from lowbit.deploy import format_report, verify
from lowbit.runtime.engine import IntegerModel
from lowbit.runtime.fastpath import FastModel, available
from tests.export.test_user_models import TorchvisionStyleNet, _export, _pixels, _quantized, _randomise_bn


@pytest.mark.skipif(not available(), reason="no oneDNN quantized ops in this PyTorch build")
def test_verify_reports_the_fast_path_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = _quantized(_randomise_bn(TorchvisionStyleNet()))
    runtime = IntegerModel.load(_export(model, tmp_path).path)
    report = verify(runtime, _pixels(40, seed=3), fast=FastModel(runtime, compile=False), batch_size=16)
    fast = report["fast_path"]
    assert fast["logits_differing"] == 0 and fast["max_logit_diff"] == 0
    assert set(fast["paths"]) == {n.name for n in runtime.nodes if n.op in ("conv2d", "linear")}
    text = format_report(report)
    assert "integer logits bit-exact (0 differ)" in text
    assert any(line.startswith("fast path layers: ") and "conv/linear on oneDNN int8" in line
               for line in text.splitlines())


def test_report_counts_in_kernel_layers_as_int8_not_as_float_path():
    report = {"images": 8, "runtime": {}, "fast_path": {
        "top1_agreement_with_runtime": 1.0, "logits_differing": 0.0, "max_logit_diff": 0.0,
        "paths": {"conv1": "int8 fused", "conv2": "int8", "fc": "exact float (int16 saturation)"}}}
    line = next(x for x in format_report(report).splitlines() if x.startswith("fast path layers: "))
    assert line.startswith("fast path layers: 2/3 conv/linear on oneDNN int8 (1 requantizing in the kernel")
    assert "conv1" not in line.split("exact float path for")[1] and "fc [exact float" in line

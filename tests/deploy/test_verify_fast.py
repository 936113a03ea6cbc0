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

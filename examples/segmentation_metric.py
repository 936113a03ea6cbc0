"""ALPS on a segmentation task, scored by mean IoU instead of top-1 accuracy.

lowbit's loop trains any model whose output F.cross_entropy accepts: per-pixel logits (N, C, H, W) against masks
(N, H, W) work as they are. What changes is the metric ALPS measures, given here through the metric hook.

    python examples/segmentation_metric.py        # a few seconds on a CPU

From the command line the same hook is ``--metric package.module:function`` (the module on PYTHONPATH), for
runs of registry models; this script's network is not in the registry, so it calls the Python API.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.data import DataSplits, TensorDataset, iterate
from lowbit.metrics import register_metric
from lowbit.quant import Plan, QuantConfig, calibrate_, quantize_
from lowbit.sensitivity import alps_fit_config, alps_scores
from lowbit.train import FitConfig, calibration_batches, fit


def synthetic_segmentation(n_train: int = 256, n_val: int = 64, n_test: int = 64, size: int = 16,
                           num_classes: int = 3, seed: int = 0) -> DataSplits:
    """Noisy images with one rectangle per foreground class; each class has its own brightness."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> TensorDataset:
        masks = torch.zeros(n, size, size, dtype=torch.int64)
        for i in range(n):
            for c in range(1, num_classes):
                h, w = torch.randint(3, size // 2, (2,), generator=g).tolist()
                y = torch.randint(0, size - h, (1,), generator=g).item()
                x = torch.randint(0, size - w, (1,), generator=g).item()
                masks[i, y:y + h, x:x + w] = c
        level = torch.linspace(40, 220, num_classes)[masks]  # (N, H, W)
        images = (level + 25 * torch.randn(n, size, size, generator=g)).clamp(0, 255).round().to(torch.uint8)
        return TensorDataset(images[:, None], masks, 0.5, 0.25, num_classes)

    return DataSplits(make(n_train), make(n_val), make(n_test), "synthetic-segmentation")


class TinyFCN(nn.Module):
    """Four convolutions, no pooling: per-pixel class logits at the input resolution."""

    def __init__(self, num_classes: int = 3, width: int = 8):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(1, width), block(width, width), block(width, width))
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, C, H, W)


@register_metric("miou")
@torch.no_grad()
def miou(model: nn.Module, dataset, *, batch_size: int = 512, device: str = "cpu") -> float:
    """Mean intersection over union over the classes present in the masks or the predictions."""
    was_training = model.training
    model.eval()
    c = dataset.num_classes
    confusion = torch.zeros(c * c, dtype=torch.int64)
    for x, y in iterate(dataset, batch_size, device=device):
        pred = model(x).argmax(1)
        confusion += torch.bincount((y * c + pred).flatten().cpu(), minlength=c * c)
    model.train(was_training)
    confusion = confusion.view(c, c).double()  # rows: truth, columns: prediction
    inter = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - inter
    return (inter[union > 0] / union[union > 0]).mean().item()


def main(n_train: int = 256, size: int = 16, epochs: float = 3, alps_epochs: float = 0.5, quiet: bool = False):
    """fp32 training, W4A4 LSQ fine-tune, then ALPS scored by mIoU (seconds on a CPU at the defaults)."""
    torch.manual_seed(0)
    data = synthetic_segmentation(n_train=n_train, n_val=n_train // 4, n_test=n_train // 4, size=size)
    model = TinyFCN(data.num_classes)
    fit(model, data, FitConfig(epochs=epochs, batch_size=32, lr=0.05, augmentation="none", quiet=True))
    quantize_(model, Plan.preset("w4a4", model), QuantConfig(method="lsq"))
    calibrate_(model, calibration_batches(data, batch_size=32, n_batches=2))
    fit(model, data, FitConfig(epochs=1, batch_size=32, lr=0.01, augmentation="none", quiet=True))
    if not quiet:
        print(f"W4A4 mIoU on validation: {miou(model, data.val):.3f}")
    # augmentation="none": lowbit's flips move the image but not the mask
    table = alps_scores(model, data, fit=alps_fit_config(alps_epochs, batch_size=32, augmentation="none"),
                        metric="miou")
    if not quiet:
        print(table.render())
    return table


if __name__ == "__main__":
    main()

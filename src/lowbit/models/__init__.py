"""Models: a registry of small 28×28 networks plus torchvision/timm models by prefix."""

from lowbit.models.registry import create_model, list_models, model_help, register_model
from lowbit.models.resnet import MLP, BasicBlock, ResNet

__all__ = ["MLP", "BasicBlock", "ResNet", "create_model", "list_models", "model_help", "register_model"]

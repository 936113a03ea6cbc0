"""Models: a registry of small 28×28 networks plus torchvision/timm models by prefix; local weight files."""

from lowbit.models.registry import create_model, list_models, model_help, register_model, user_model
from lowbit.models.resnet import MLP, BasicBlock, ResNet
from lowbit.models.weights import load_weights_, read_weights

__all__ = ["MLP", "BasicBlock", "ResNet", "create_model", "list_models", "load_weights_",
           "model_help", "read_weights", "register_model", "user_model"]

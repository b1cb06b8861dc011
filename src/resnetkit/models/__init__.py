"""The model zoo. Importing this package registers every builder (ResNets first, then ResNet-9, then DenseNets)."""

from resnetkit.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: I001  (import order = listing order)
from resnetkit.models.resnet9 import ResNet9
from resnetkit.models.densenet import DenseNet
from resnetkit.models.weights import WeightsError, load_weights, pretrained_state_dict, read_state_dict
from resnetkit.registry import create_model, default_input_size, list_models

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "DenseNet",
    "ResNet",
    "ResNet9",
    "WeightsError",
    "create_model",
    "default_input_size",
    "list_models",
    "load_weights",
    "pretrained_state_dict",
    "read_state_dict",
]

"""The model zoo: ResNets (resnet.py: the 2016 family, ResNet-D, SE/ECA, pre-activation), their extra layers
(layers.py: SE, ECA, stochastic depth), ResNet-9 (resnet9.py), DenseNets (densenet.py), weights loading (weights.py).

The registry (`resnetkit.registry`) imports the zoo modules, which register their builders, on its first use; the
names below load lazily, so `import resnetkit.models` (and `resnetkit --help`) costs no torch.
"""

from resnetkit._lazy import attach

ZOO_MODULES = ("resnetkit.models.resnet", "resnetkit.models.resnet9", "resnetkit.models.densenet")  # listing order

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "BasicBlock": "resnetkit.models.resnet",
        "Bottleneck": "resnetkit.models.resnet",
        "ResNet": "resnetkit.models.resnet",
        "PreActResNet": "resnetkit.models.resnet",
        "PreActBasicBlock": "resnetkit.models.resnet",
        "PreActBottleneck": "resnetkit.models.resnet",
        "SqueezeExcite": "resnetkit.models.layers",
        "EfficientChannelAttention": "resnetkit.models.layers",
        "DropPath": "resnetkit.models.layers",
        "ResNet9": "resnetkit.models.resnet9",
        "DenseNet": "resnetkit.models.densenet",
        "WeightsError": "resnetkit.models.weights",
        "load_weights": "resnetkit.models.weights",
        "pretrained_state_dict": "resnetkit.models.weights",
        "read_state_dict": "resnetkit.models.weights",
        "create_model": "resnetkit.registry",
        "default_input_size": "resnetkit.registry",
        "list_models": "resnetkit.registry",
    },
)

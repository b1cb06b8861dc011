"""resnetkit: the ResNet family, from building to serving.

>>> import resnetkit
>>> model = resnetkit.create_model("resnet18", num_classes=10, stem="cifar")
>>> result = resnetkit.train(resnetkit.load_config("configs/demo.yaml"))

The names below load lazily, on first use: `import resnetkit` costs only this file, and each name imports just
the part of the package it lives in. (`resnetkit.train` is the training package, which is callable: see
`resnetkit/train/__init__.py`.)
"""

from resnetkit._lazy import attach
from resnetkit._version import __version__

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "create_model": "resnetkit.models",
        "list_models": "resnetkit.models",
        "load_weights": "resnetkit.models",
        "train": "resnetkit.train",
        "train_folds": "resnetkit.train.folds",
        "load_config": "resnetkit.config",
        "compare": "resnetkit.study.compare",
        "tune": "resnetkit.study.tune",
        "lr_find": "resnetkit.study.lr_find",
        "evaluate": "resnetkit.evaluation.evaluate",
        "evaluate_task": "resnetkit.evaluation.evaluate",
        "load_bundle": "resnetkit.bundle",
        "decode_image": "resnetkit.data.image",
        "Predictor": "resnetkit.deploy.predict",
        "export_model": "resnetkit.deploy.export",
        "optimize_for_cpu": "resnetkit.deploy.engine",
        "build_dataset": "resnetkit.data",
        "build_loader": "resnetkit.data",
        "create_segmentation_model": "resnetkit.tasks.segmentation",
        "create_detector": "resnetkit.tasks.detection",
    },
)
__all__ = ["__version__", *__all__]

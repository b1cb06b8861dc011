"""Datasets, the one image decoder, augmentation presets and loaders (see docs/data.md).

>>> from resnetkit.data import build_loader
>>> loader = build_loader("shapes", "train", preset="cifar", batch_size=128, train=True, device="cpu")

The names below load lazily, so `import resnetkit.data` (and `resnetkit --help`) costs no torch.
"""

from resnetkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        **dict.fromkeys(
            [
                "CIFAR",
                "CUB200",
                "CifarMosaic",
                "ImageFolder",
                "Shapes",
                "ShapesMulti",
                "SkippedSample",
                "build_dataset",
                "imagenet_classes",
            ],
            "resnetkit.data.datasets",
        ),
        **dict.fromkeys(
            ["DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES", "BadImageError", "ImageTooLarge", "decode_image", "list_images"],
            "resnetkit.data.image",
        ),
        **dict.fromkeys(
            ["FileLoader", "Loader", "TensorLoader", "build_loader", "collate_skipping"], "resnetkit.data.loader"
        ),
        **dict.fromkeys(["SHAPE_CLASSES", "render_shapes"], "resnetkit.data.synthetic"),
        **dict.fromkeys(
            [
                "PRESETS",
                "build_transform",
                "compute_mean_std",
                "eval_transform_from",
                "mixup_cutmix",
                "preprocess_info",
            ],
            "resnetkit.data.transforms",
        ),
    },
)

"""resnetkit: the ResNet family, from building to serving.

>>> import resnetkit
>>> model = resnetkit.create_model("resnet18", num_classes=10, stem="cifar")
"""

__version__ = "0.1.0"

from resnetkit.data import build_dataset, build_loader  # noqa: E402
from resnetkit.deploy.engine import optimize_for_cpu  # noqa: E402
from resnetkit.deploy.export import export_model  # noqa: E402
from resnetkit.deploy.predict import Predictor  # noqa: E402
from resnetkit.evaluate import evaluate  # noqa: E402
from resnetkit.models import create_model, list_models, load_weights  # noqa: E402  (registers the zoo)
from resnetkit.tasks.detection import create_detector  # noqa: E402
from resnetkit.tasks.segmentation import create_segmentation_model  # noqa: E402
from resnetkit.train import train  # noqa: E402  (the function; the package stays importable as resnetkit.train.*)

__all__ = [
    "__version__",
    "create_model",
    "list_models",
    "load_weights",
    "train",
    "evaluate",
    "Predictor",
    "export_model",
    "optimize_for_cpu",
    "build_dataset",
    "build_loader",
    "create_segmentation_model",
    "create_detector",
]

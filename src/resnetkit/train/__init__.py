"""Training: the one engine for every task (`fit.py`), its step (`loop.py`), optimisers and schedules (`optim.py`),
DDP (`distributed.py`), and the progress bar and run logger (`monitor.py`).

    >>> import resnetkit
    >>> result = resnetkit.train(resnetkit.load_config("configs/demo.yaml"))

`resnetkit.train` is this package and also the function: calling the package runs `fit.train`. (A package and a
function of the same name cannot both be the attribute `resnetkit.train`; importing any of its modules would put
the package there. So the package itself is callable.) The engine is imported when it runs.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def train(config: Any, **kwargs: Any):
    """Run the training job `config` describes (a Config, a YAML path, or a dict); returns a RunResult."""
    from resnetkit.train.fit import train as _train

    return _train(config, **kwargs)


class _CallablePackage(types.ModuleType):
    def __call__(self, config: Any, **kwargs: Any):
        return train(config, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

__all__ = ["train"]

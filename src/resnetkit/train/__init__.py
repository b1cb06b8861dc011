"""Training: `train(config)` runs a whole training job; `monitor` has the progress bar and run logger.

    >>> import resnetkit
    >>> result = resnetkit.train(resnetkit.config.load_config("configs/demo.yaml"))

The heavy parts (data, loop) are imported when `train` runs, so `import resnetkit` stays light.
"""

from __future__ import annotations

from typing import Any


def train(config: Any, **kwargs: Any):
    """Run the training job `config` describes (a Config, a YAML path, or a dict); returns a RunResult."""
    from resnetkit.train.fit import train as _train

    return _train(config, **kwargs)


__all__ = ["train"]

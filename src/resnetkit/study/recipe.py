"""Config values as `compare --vary` and `tune`'s search space name them: a dotted key takes a value as `--set`
would (`optim.lr: 0.05`, `optim.switch: {epoch: 10, name: sgd, lr: 0.01}`, `optim.momentum_warmup.start: 0.5`),
and a section takes a whole option group, a mapping of its keys set together (`optim: {name: adam, lr: 0.001}`),
or, for `optim`, a named preset (`optim: nag`).

    >>> cfg = with_values(base, {"optim": "nag", "optim.weight_decay": 5e-4})

Torch-free, so that the commands' --help lists the presets without loading it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from resnetkit.config import Config, ConfigError, config_from_dict, set_key

# The source's seven optimisers (and AdamW), each at the learning rate its authors or PyTorch's defaults give it
# (OPTIM_PRESET_SOURCES says which); weight decay and the rest of `optim` are the base recipe's. An optimiser's keys
# that another preset sets (momentum, nesterov, eps) are set here too, so that a preset does not inherit them.
OPTIM_PRESETS: dict[str, dict[str, Any]] = {
    "sgd": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "nesterov": False},
    "sgdm": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False},
    "nag": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
    "adagrad": {"name": "adagrad", "lr": 0.01, "eps": 1e-10},
    "adadelta": {"name": "adadelta", "lr": 1.0, "eps": 1e-6},
    "rmsprop": {"name": "rmsprop", "lr": 0.001, "momentum": 0.0, "eps": 1e-8},
    "adam": {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8},
    "adamw": {"name": "adamw", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8},
}
OPTIM_PRESET_SOURCES: dict[str, str] = {
    "sgd": "plain SGD at He et al. 2016's CIFAR lr 0.1 (sec. 4.2) without its momentum, so momentum's effect shows",
    "sgdm": "SGD, momentum 0.9, lr 0.1: He et al. 2016, sec. 4.2",
    "nag": "Nesterov momentum in Sutskever et al. 2013's form (PyTorch's nesterov=True), He et al.'s lr 0.1",
    "adagrad": "AdaGrad (Duchi et al. 2011) at PyTorch's defaults: lr 0.01, eps 1e-10",
    "adadelta": "AdaDelta (Zeiler 2012) has no lr: 1.0 applies its update as the paper does; eps 1e-6 as there",
    "rmsprop": "RMSProp at Hinton's lecture 6e lr (Keras' default) 0.001, no momentum",
    "adam": "Adam at Kingma and Ba 2015's defaults: lr 0.001, betas (0.9, 0.999), eps 1e-8",
    "adamw": "AdamW (Loshchilov and Hutter 2019) at Adam's defaults, decoupled weight decay",
}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {"optim": OPTIM_PRESETS}
"""The sections that have named presets, and theirs."""

SOURCE_OPTIMIZERS = ("sgd", "sgdm", "nag", "adagrad", "adadelta", "rmsprop", "adam")
"""The seven optimisers of the source's CUB-200 study, as presets."""


def with_values(base: Config, values: Mapping[str, Any], source: str = "config") -> Config:
    """`base` with each (key, value) of `values` set in order, validated once; errors name `source` and the key."""
    data = base.to_dict()
    sections = {k for k, v in data.items() if isinstance(v, dict)}
    for key, value in values.items():
        try:
            if key in sections:
                group = _group(key, value)
                for sub, sub_value in group.items():
                    set_key(data, f"{key}.{sub}", sub_value)
            else:
                set_key(data, key, value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return config_from_dict(data, source)


def _group(section: str, value: Any) -> dict[str, Any]:
    """The keys a section's value sets: a mapping's, or a named preset's."""
    if isinstance(value, Mapping):
        return dict(value)
    presets = PRESETS.get(section, {})
    if isinstance(value, str) and value in presets:
        return presets[value]
    if presets:
        raise ConfigError(
            f"{section}: expected a mapping of its keys or a preset ({', '.join(presets)}), got {value!r}"
        )
    raise ConfigError(f"{section}: expected a mapping of its keys, e.g. {{name: ..., ...}}, got {value!r}")


def parse_values(text: str) -> list[Any]:
    """`v1,v2,...` as a YAML flow list, so that a value may itself hold commas: `sgd,{name: adam, lr: 0.001}`."""
    try:
        values = yaml.safe_load(f"[{text}]")
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse {text!r} as comma-separated YAML values: {e}") from None
    if not values:
        raise ConfigError(f"no values in {text!r}")
    return values


def flow(value: Any) -> str:
    """A value as one line of YAML flow style (what a table shows and --vary reads back)."""
    if isinstance(value, str) or not isinstance(value, (Mapping, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()


def label(values: Mapping[str, Any]) -> str:
    """A run-folder name for one combination: a preset by its name, a section's option group by its keys and values
    (`name-adam,lr-0.001`), any other value by its key's last part and the value (`lr=0.05`,
    `switch=epoch-2,name-sgd,lr-0.05`); characters unsafe in a file name become '-'."""

    def slug(value: Any) -> str:
        if isinstance(value, Mapping):
            return ",".join(f"{k}-{slug(v)}" for k, v in value.items())
        if isinstance(value, list):
            return ",".join(slug(v) for v in value)
        return flow(value)

    parts = []
    for key, value in values.items():
        if isinstance(value, str) and value in PRESETS.get(key, {}):
            parts.append(value)
        elif isinstance(value, Mapping) and "." not in key:  # a section's option group: its keys say enough
            parts.append(slug(value))
        else:
            parts.append(f"{key.rsplit('.', 1)[-1]}={slug(value)}")
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "-", "_".join(parts)).strip("-") or "base"

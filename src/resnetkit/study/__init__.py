"""Choosing how to train: runs of the one engine (`resnetkit.train.fit.train`) compared, searched and swept.

    resnetkit compare --config configs/cifar10_resnet20.yaml --subset 10000 --vary optim=sgd,sgdm,nag,adam
    resnetkit tune --config configs/cifar10_resnet20.yaml --space space.yaml --trials 30
    resnetkit lr-find --config configs/cifar10_resnet20.yaml

`recipe.py` sets config values as both `compare --vary` and `tune`'s search space name them (dotted keys, whole
option groups, named optimiser presets); `compare.py`, `tune.py` (Optuna) and `lr_find.py` are the three studies;
`cli.py` their commands. No torch or optuna at import: each module imports them where it runs.
"""

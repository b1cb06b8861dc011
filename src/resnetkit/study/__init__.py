"""Choosing how to train: runs of the one engine (`resnetkit.train.fit.train`) compared and swept.

    resnetkit compare --config configs/cifar10_resnet20.yaml --subset 10000 --vary optim=sgd,sgdm,nag,adam
    resnetkit lr-find --config configs/cifar10_resnet20.yaml

`recipe.py` sets config values as `compare --vary` names them (dotted keys, whole option groups, named optimiser
presets); `compare.py` and `lr_find.py` are the studies, `cli.py` their commands. No torch at import: each module
imports it where it runs.
"""

"""Choosing how to train: runs of the one engine (`resnetkit.train.fit.train`) compared side by side.

    resnetkit compare --config configs/cifar10_resnet20.yaml --subset 10000 --vary optim=sgd,sgdm,nag,adam

`recipe.py` sets config values as `compare --vary` names them (dotted keys, whole option groups, named optimiser
presets); `compare.py` is the study, `cli.py` its command. No torch at import: each module imports it where it runs.
"""

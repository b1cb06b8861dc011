"""Loading weights: files of every kind, safely, with one clear error when they do not fit."""

from __future__ import annotations

import pickle
import urllib.error

import pytest
import torch
from safetensors.torch import save_file

from resnetkit import create_model, load_weights
from resnetkit.bundle import load_bundle
from resnetkit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from resnetkit.models import WeightsError, pretrained_state_dict, read_state_dict


@pytest.fixture
def tiny_state():
    torch.manual_seed(1)
    return create_model("resnet20").state_dict()


def _equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pth_training_checkpoint_and_safetensors_all_load(tmp_path, tiny_state):
    torch.save(tiny_state, tmp_path / "w.pth")
    torch.save({"model": tiny_state, "epoch": 3, "classes": ["a"]}, tmp_path / "ckpt.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny_state.items()}}, tmp_path / "ddp.pt")
    save_file({k: v.contiguous() for k, v in tiny_state.items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "ckpt.pt", "ddp.pt", "w.safetensors"):
        model = load_weights(create_model("resnet20"), tmp_path / name)
        assert _equal_states(model.state_dict(), tiny_state), name


def test_create_model_with_weights_file(tmp_path, tiny_state):
    torch.save(tiny_state, tmp_path / "w.pth")
    model = create_model("resnet20", weights=str(tmp_path / "w.pth"))
    assert _equal_states(model.state_dict(), tiny_state)


def test_code_in_a_checkpoint_is_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(WeightsError, match="evil.pt") as info:
        read_state_dict(tmp_path / "evil.pt")
    # resnetkit's own one-line refusal: never torch's advice to re-run with weights_only=False
    message = str(info.value)
    assert "weights_only" not in message and "\n" not in message
    torch.save({"model": {}, "config": Evil()}, tmp_path / "evil_zip.pt")  # torch.save's zip format too
    with pytest.raises(
        CheckpointError, match=r"refusing to read .*evil_zip.pt: it holds pickled Python objects \(print\)"
    ) as info:
        load_checkpoint(tmp_path / "evil_zip.pt")
    assert "weights_only" not in str(info.value)


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path, tiny_state):
    state = dict(tiny_state)
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(100, 64)
    state["fc.bias"] = torch.zeros(100)
    with pytest.raises(WeightsError) as info:
        load_weights(create_model("resnet20"), state)
    message = str(info.value)
    assert "missing keys: layer1.0.conv1.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "fc.weight: file (100, 64) vs model (10, 64)" in message
    assert "replace_head=True" in message


def test_head_of_another_size_is_replaced_on_request():
    torch.manual_seed(0)
    source = create_model("resnet18", num_classes=1000).state_dict()
    model = create_model("resnet18", num_classes=10)
    own_head = model.fc.weight.clone()
    load_weights(model, source, replace_head=True)
    assert torch.equal(model.layer4[1].conv2.weight, source["layer4.1.conv2.weight"])
    assert torch.equal(model.fc.weight, own_head)  # the new 10-way head, not a slice of the old one


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_model("resnet18", weights=str(tmp_path / "nope.pth"))


def test_offline_pretrained_download_says_how_to_pass_a_file(monkeypatch):
    def no_network(*args, **kwargs):  # the one thing a test may not do here: download
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(RuntimeError, match=r"resnet50-0676ba61\.pth.*weights='/path/to/resnet50-0676ba61\.pth'"):
        pretrained_state_dict("resnet50", "imagenet")
    with pytest.raises(RuntimeError, match=r"resnet50-11ad3fa6\.pth"):
        pretrained_state_dict("resnet50", "imagenet-v2")


def test_unknown_weight_sets_are_refused():
    with pytest.raises(ValueError, match="no weights for 'resnet20'"):
        pretrained_state_dict("resnet20", "imagenet")
    with pytest.raises(ValueError, match="no IMAGENET1K_V2 weights for resnet18"):
        pretrained_state_dict("resnet18", "imagenet-v2")
    with pytest.raises(ValueError, match="unknown weight set"):
        pretrained_state_dict("resnet18", "imagenet-21k")


def test_checkpoint_save_is_atomic_and_round_trips(tmp_path, tiny_state):
    path = tmp_path / "run" / "last.pt"
    meta = {"model_name": "resnet20", "model_kwargs": {"num_classes": 10}, "classes": list("abcdefghij")}
    save_checkpoint(path, {"model": tiny_state, **meta})
    bundle = load_bundle(path)
    model, ckpt = bundle.model, bundle.checkpoint
    assert ckpt["classes"] == meta["classes"] and bundle.classes == meta["classes"] and not model.training
    assert _equal_states(model.state_dict(), tiny_state)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(path, {"model": {}, "bad": Boom()})
    assert _equal_states(load_checkpoint(path)["model"], tiny_state)  # the good file is still there
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_load_checkpoint_errors_name_the_file(tmp_path, tiny_state):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save(tiny_state, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare.pt is not a resnetkit checkpoint"):
        load_checkpoint(tmp_path / "bare.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")

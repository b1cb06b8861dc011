"""The later ResNets: ResNet-D, SE and ECA blocks, pre-activation ResNets and stochastic depth.

Each timm-named model equals timm's (parameters, state-dict layout, outputs both ways); the CIFAR pre-activation
networks have the paper's parameter counts; and one model per new family works everywhere a zoo model is used:
features/head/stages, Grad-CAM, Faster R-CNN + FPN, U-Net, ONNX export, the CPU engine, summary, hub, bundle.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from resnetkit import create_model
from resnetkit.models.summary import count_params, summarize, total_macs

REPO = Path(__file__).resolve().parents[1]
TIMM_NAMES = [
    "resnet18d",
    "resnet34d",
    "resnet50d",
    "resnet101d",
    "resnet152d",
    "seresnet50",
    "seresnet101",
    "seresnext50_32x4d",
    "seresnext101_32x8d",
    "ecaresnet50d",
    "ecaresnet101d",
    "resnetv2_50",
    "resnetv2_101",
]
# "Identity Mappings" (He et al. 2016) prints 1.7M, 1.7M and 10.2M parameters (10 classes); all parameters counted,
# these networks have the figures osmr/imgclsmob publishes for its PreResNet-110/164(BN)/1001 (CIFAR-10).
PAPER_PREACT_M = {"preact_resnet110": 1.7, "preact_resnet164": 1.7, "preact_resnet1001": 10.2}
ALL_PARAMS = {"preact_resnet110": 1_730_522, "preact_resnet164": 1_703_258, "preact_resnet1001": 10_327_706}
# One model of each new family: ResNet-D, SE, ECA, ResNetV2, the CIFAR pre-activation networks.
FAMILIES = ["resnet18d", "seresnet50", "ecaresnet50d", "resnetv2_50", "preact_resnet110"]


@pytest.fixture(autouse=True)
def one_thread():
    # Two intra-op threads on two shared cores spin against each other: one thread is several times faster here.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _size(name: str) -> int:
    return 32 if name.startswith("preact") else 64


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Random BN statistics and affine terms, so that eval outputs depend on every buffer and no branch is zero
    (timm zero-initialises the last BN of each branch)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.1)
    return model


def _calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BN statistics of `x` itself, so that eval-mode activations keep a trained network's scale even 110 layers
    deep (random statistics let a pre-activation network's residual sum grow with depth)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: after one batch, that batch's statistics
    with torch.no_grad():
        model.train()(x)
    return model.eval()


# ------------------------------------------------------------------------------------------ equal to timm


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_parameters_state_dict_and_outputs_equal_timm(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    theirs = _randomise_norms(timm.create_model(name, pretrained=False)).eval()
    ours = _randomise_norms(create_model(name)).eval()  # other random weights than theirs
    assert count_params(ours) == count_params(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # same keys, same order
    x = torch.randn(2, 3, 40, 40)  # 40 -> 20 -> 10 -> 5 -> 3 -> 2: odd sizes for the ceil-mode average pools
    with torch.no_grad():
        theirs_out, ours_out = theirs(x), ours(x)
        theirs_state = {k: v.clone() for k, v in theirs.state_dict().items()}
        theirs.load_state_dict(ours.state_dict())  # strict, ours -> timm
        ours.load_state_dict(theirs_state)  # strict, timm -> ours
        assert (ours(x) - theirs_out).abs().max() <= 1e-5
        assert (theirs(x) - ours_out).abs().max() <= 1e-5


@pytest.mark.parametrize("name", sorted(PAPER_PREACT_M))
def test_cifar_preact_parameter_counts_match_the_paper(name):
    model = create_model(name, num_classes=10)
    assert count_params(model) == ALL_PARAMS[name]
    # The paper's figures are those of the convolutions and the classifier: BN's affine terms left out.
    weights = sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters())
    assert round(weights / 1e6, 1) == PAPER_PREACT_M[name]
    assert model.get_classifier().weight.shape == (10, 256 if name != "preact_resnet110" else 64, 1, 1)


def test_the_variants_are_what_their_papers_describe():
    d = create_model("resnet50d")
    assert [m.out_channels for m in d.conv1 if isinstance(m, nn.Conv2d)] == [32, 32, 64]  # ResNet-C stem
    assert isinstance(d.layer2[0].downsample[0], nn.AvgPool2d)  # ResNet-D shortcut: pool, then a 1x1 conv
    assert d.layer2[0].downsample[1].stride == (1, 1) and d.layer2[0].conv2.stride == (2, 2)  # ResNet-B stride
    se = create_model("seresnet50").layer1[0].se
    assert (se.fc1.out_channels, se.fc2.out_channels) == (16, 256)  # reduction 16
    eca = create_model("ecaresnet50d")
    assert [eca.layer1[0].se.conv.kernel_size[0], eca.layer4[0].se.conv.kernel_size[0]] == [5, 7]
    assert count_params(eca) - count_params(d) == 86
    v2 = create_model("resnetv2_50")
    assert [n for n, _ in v2.stages[0].blocks[0].named_children()][:3] == ["downsample", "norm1", "conv1"]


# ------------------------------------------------------------------------------------------ stochastic depth


@pytest.mark.parametrize("name", ["resnet50d", "resnetv2_50"])
def test_drop_path_rates_and_training_outputs_equal_timm(name):
    timm = pytest.importorskip("timm")
    ours = _randomise_norms(create_model(name, drop_path_rate=0.3)).train()
    theirs = timm.create_model(name, pretrained=False, drop_path_rate=0.3).train()
    theirs.load_state_dict(ours.state_dict())
    rates = [m.p for m in ours.modules() if type(m).__name__ == "DropPath"]
    timm_rates = [m.drop_prob for m in theirs.modules() if type(m).__name__ == "DropPath"]
    assert rates == pytest.approx(timm_rates, abs=1e-6)  # 15 blocks with a rate: the first one has none
    assert rates == pytest.approx([0.3 * i / 15 for i in range(1, 16)])  # linear in depth, the last at 0.3
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    theirs_out = theirs(x)
    torch.manual_seed(1)
    assert (ours(x) - theirs_out).abs().max() <= 1e-4  # the same per-sample draws as timm


@pytest.mark.parametrize("name", ["resnet18d", "resnetv2_50", "preact_resnet110", "resnet20", "resnet9"])
def test_drop_path_changes_training_and_leaves_eval_alone(name):
    torch.manual_seed(0)
    plain = _randomise_norms(create_model(name, num_classes=5))
    dropping = create_model(name, num_classes=5, drop_path_rate=0.5)
    dropping.load_state_dict(plain.state_dict())  # no new parameters or buffers
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dropping.eval()(x), plain.eval()(x))  # off in eval
        dropping.train()
        plain.train()
        torch.manual_seed(1)
        first = dropping(x)
        torch.manual_seed(1)
        assert torch.equal(dropping(x), first)  # seeded
        assert not torch.allclose(first, plain(x))
        torch.manual_seed(2)
        assert not torch.allclose(dropping(x), first)  # another draw, other blocks dropped
    depth_rates = [m.p for m in dropping.modules() if type(m).__name__ == "DropPath"]
    assert depth_rates == sorted(depth_rates) and depth_rates[-1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="drop_path_rate"):
        create_model(name, drop_path_rate=1.0)


# ------------------------------------------------------------------------------------------ everywhere a model is used


@pytest.mark.parametrize("name", FAMILIES)
def test_features_head_stages_and_gradcam(name):
    from resnetkit.evaluation.explain import gradcam

    torch.manual_seed(0)
    model = create_model(name, num_classes=5).eval()
    size = _size(name)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[1] == model.num_features
        assert torch.equal(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
        stages = model.forward_stages(x)
        assert torch.equal(stages[-1], feats)  # the last stage is what the head reads
    assert len(stages) == len(model.feature_info)
    for fmap, info in zip(stages, model.feature_info):
        assert fmap.shape[1] == info["channels"] and fmap.shape[-1] == size // info["reduction"], info
        model.get_submodule(info["name"])  # Grad-CAM's layers and `model.freeze: stages:N` look stages up by name
    heat = gradcam(model, x, layer=model.feature_info[-2]["name"])
    assert heat.shape == (2, size, size) and torch.isfinite(heat).all()
    assert gradcam(model, x).shape == (2, size, size)  # the default layer: the last feature map
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", FAMILIES)
def test_detector_and_unet_on_every_new_family(name):
    from resnetkit.tasks.detection import create_detector
    from resnetkit.tasks.segmentation import create_segmentation_model
    from resnetkit.train.optim import apply_freeze

    torch.manual_seed(0)
    levels = len(create_model(name).feature_info)  # the stages plus the extra max-pooled level
    small = dict(min_size=64, max_size=64, fpn_channels=16, representation_size=32, rpn_batch_size=16)
    small.update(roi_batch_size=16, proposals_train=20, proposals_test=10, anchor_sizes=[8, 16, 32, 64, 128][:levels])
    detector = create_detector(backbone=name, num_classes=2, trainable_layers=2, **small).train()
    body = detector.backbone.body
    last, before = body.feature_info[-1]["name"], body.feature_info[-2]["name"]
    learning = {n for n, p in body.named_parameters() if p.requires_grad}
    assert learning and all(n.startswith((last, before, "norm.")) for n in learning)
    images = [torch.rand(3, 64, 64), torch.rand(3, 56, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8, 40, 48]]), "labels": torch.tensor([1])}] * 2
    losses = detector(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in body.parameters() if p.requires_grad)  # no unused trainable parameter

    unet = create_segmentation_model("unet", name, num_classes=3, decoder_channels=16).train()
    out = unet(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 3, 48, 48)
    out.square().mean().backward()
    assert all(p.grad is not None for p in unet.parameters())  # DDP would refuse an unused one
    classifier = create_model(name)
    apply_freeze(classifier, "stages:1")  # the stem and the first stage
    frozen = {n.split(".")[0] for n, p in classifier.named_parameters() if not p.requires_grad}
    assert frozen == ({"stem", "stages"} if "preact" in name or "v2" in name else {"conv1", "bn1", "layer1"})


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_export_and_cpu_engine_match_eager(tmp_path, name):
    from resnetkit.deploy.engine import optimize_for_cpu
    from resnetkit.deploy.export import export_model

    torch.manual_seed(0)
    size = _size(name)
    model = _calibrated(create_model(name, num_classes=4), torch.randn(8, 3, size, size))
    preprocess = {"input_size": size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    report = export_model(model, tmp_path / "model.onnx", "onnx", preprocess, model_name=name)
    assert report.passed and report.max_abs_diff <= 1e-4, report.summary()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert (optimize_for_cpu(model)(x) - model(x)).abs().max() <= 1e-4


def test_summary_counts_the_new_layers():
    def macs(name: str) -> dict[str, int]:
        return {r.name: r.macs for r in summarize(create_model(name), 224)}

    base, d, se, eca = macs("resnet50"), macs("resnet50d"), macs("seresnet50"), macs("ecaresnet50d")
    assert d["conv1"] == 112 * 112 * (27 * 32 + 9 * 32 * 32 + 9 * 32 * 64)  # the deep stem's three 3x3 convs
    assert all(d[f"layer{i}"] == base[f"layer{i}"] for i in range(1, 5))  # pooled 1x1 convs cost what strided ones did
    # SE: two 1x1 convs on a 1x1 map per block (C -> C/16 -> C); ECA: a k-tap 1-D conv over the C channels.
    blocks = [(256, 3), (512, 4), (1024, 6), (2048, 3)]
    assert sum(se.values()) - sum(base.values()) == sum(n * 2 * c * (c // 16) for c, n in blocks)
    assert sum(eca.values()) - sum(d.values()) == sum(n * c * (5 if c < 2048 else 7) for c, n in blocks)
    v2 = summarize(create_model("resnetv2_50"), 224)
    assert [r.name for r in v2][:5] == ["stem", "stages.0", "stages.1", "stages.2", "stages.3"]
    assert sum(r.macs for r in v2) == total_macs(create_model("resnetv2_50")) == sum(base.values())


def test_models_command_lists_the_new_families(capsys):
    from resnetkit.cli import main

    assert main(["models", "--family", "cifar"]) == 0
    out = capsys.readouterr().out
    for name, params in ALL_PARAMS.items():
        assert name in out and f"{params:,}" in out
    assert main(["summary", "resnetv2_50", "--input-size", "64"]) == 0
    assert "stages.3" in capsys.readouterr().out


def test_hub_bundle_and_weights_errors(tmp_path):
    from resnetkit.bundle import load_bundle

    model = torch.hub.load(str(REPO), "resnet50d", source="local", weights=None)
    assert type(model).__name__ == "ResNet" and model.get_classifier().out_features == 1000
    model = torch.hub.load(str(REPO), "preact_resnet164", source="local", num_classes=7)
    assert type(model).__name__ == "PreActResNet" and model.get_classifier().out_channels == 7
    torch.save(model.state_dict(), tmp_path / "preact.pt")  # the classifier is a 1x1 conv: 7 classes read from it
    bundle = load_bundle(model="preact_resnet164", weights=str(tmp_path / "preact.pt"))
    assert len(bundle.classes) == 7 and bundle.preprocess["input_size"] == 32
    with pytest.raises(ValueError, match="torchvision publishes no weights for 'resnetv2_50'"):
        create_model("resnetv2_50", weights="imagenet")
    with pytest.raises(TypeError, match="unknown option 'drop_path'.*'drop_path_rate'"):
        create_model("resnet50d", drop_path=0.1)

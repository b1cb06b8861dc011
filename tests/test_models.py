"""The model zoo: every registered model builds, runs, trains, and matches torchvision exactly."""

from __future__ import annotations

import pytest
import torch
import torchvision

from resnetkit import create_model, list_models
from resnetkit.models import default_input_size
from resnetkit.models.summary import count_params

# torchvision's published parameter counts (1000 classes).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272,
    "wide_resnet50_2": 68_883_240,
    "wide_resnet101_2": 126_886_696,
    "densenet121": 7_978_856,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
}
# He et al. 2016, table 6 (10 classes), in millions, as printed in the paper.
PAPER_CIFAR_PARAMS_M = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85, "resnet110": 1.7}
SMALL = ["resnet18", "resnet50", "resnext50_32x4d", "resnet20", "resnet9", "densenet121"]
# The later refinements, checked against timm and their papers in test_zoo_variants.py.
PREACT_CIFAR = ["preact_resnet110", "preact_resnet164", "preact_resnet1001"]
VARIANTS = {"resnet18d", "resnet34d", "resnet50d", "resnet101d", "resnet152d", "seresnet50", "seresnet101"}
VARIANTS |= {"seresnext50_32x4d", "seresnext101_32x8d", "ecaresnet50d", "ecaresnet101d", "resnetv2_50", "resnetv2_101"}


@pytest.fixture(autouse=True)
def one_thread():
    # As in the other test files: on 2 shared cores two intra-op threads spin against each other. The 16
    # forward/backward cases of the later ResNets took 196 s with two threads under load, 17.5 s with one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_registry_names_are_exactly_the_zoo():
    expected = set(TORCHVISION_PARAMS) | set(PAPER_CIFAR_PARAMS_M) | {"resnet9"} | VARIANTS | set(PREACT_CIFAR)
    assert set(list_models()) == expected
    cifar = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", *PREACT_CIFAR, "resnet9"]
    assert list_models("cifar") == cifar


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_model(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_counts_match_torchvision(name):
    assert count_params(create_model(name)) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PAPER_CIFAR_PARAMS_M))
def test_cifar_parameter_counts_match_the_paper(name):
    millions = count_params(create_model(name, num_classes=10)) / 1e6
    digits = 1 if name == "resnet110" else 2  # the paper prints 1.7M for ResNet-110, two decimals for the rest
    assert round(millions, digits) == PAPER_CIFAR_PARAMS_M[name]


def test_cifar_family_has_parameter_free_shortcuts():
    model = create_model("resnet20")
    assert not [n for n in model.state_dict() if "downsample" in n]
    assert [m.shape for m in (model.layer1[0].conv1.weight, model.layer3[0].conv1.weight)] == [
        (16, 16, 3, 3),
        (64, 32, 3, 3),
    ]


def _randomise_bn_statistics(model):
    """So that eval-mode outputs depend on every buffer, not only on the weights."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_torchvision_state_dict_round_trip_gives_equal_outputs(name):
    torch.manual_seed(0)
    theirs = torchvision.models.get_model(name, weights=None).eval()
    ours = create_model(name).eval()  # different random weights from theirs
    _randomise_bn_statistics(theirs)
    _randomise_bn_statistics(ours)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs_out, ours_out = theirs(x), ours(x)
        theirs_state = {k: v.clone() for k, v in theirs.state_dict().items()}
        theirs.load_state_dict(ours.state_dict())  # ours -> torchvision
        ours.load_state_dict(theirs_state)  # torchvision -> ours
        assert (ours(x) - theirs_out).abs().max() <= 1e-5
        assert (theirs(x) - ours_out).abs().max() <= 1e-5


def test_timm_resnet50_state_dict_loads_unchanged():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    theirs = timm.create_model("resnet50", pretrained=False).eval()
    ours = create_model("resnet50").eval()
    ours.load_state_dict(theirs.state_dict())  # strict: identical keys and shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", SMALL)
def test_features_head_and_stages_fit_together(name):
    model = create_model(name, num_classes=5).eval()
    size = default_input_size(name) if default_input_size(name) == 32 else 64
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape[1] == model.num_features
        assert torch.equal(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
        stages = model.forward_stages(x)
    assert len(stages) == len(model.feature_info)
    for fmap, info in zip(stages, model.feature_info):
        assert fmap.shape[1] == info["channels"], info
        assert fmap.shape[-1] == size // info["reduction"], info
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


def test_resnet50_feature_info_matches_torchvision_strides():
    info = create_model("resnet50").feature_info
    assert [(i["channels"], i["reduction"]) for i in info] == [(64, 2), (256, 4), (512, 8), (1024, 16), (2048, 32)]


def test_cifar_stem_keeps_32px_resolution_until_layer2():
    model = create_model("resnet18", stem="cifar", num_classes=10).eval()
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, torch.nn.Identity)
    with torch.no_grad():
        stages = model.forward_stages(torch.randn(1, 3, 32, 32))
    assert [s.shape[-1] for s in stages] == [32, 32, 16, 8, 4]


def test_options_in_chans_zero_init_and_norm_layer():
    model = create_model("resnet18", in_chans=1, zero_init_residual=True)
    assert model.conv1.weight.shape[1] == 1
    assert all(not b.bn2.weight.detach().any() for b in model.layer1)
    gn = create_model("resnet18", norm_layer=lambda c: torch.nn.GroupNorm(8, c))
    assert isinstance(gn.layer1[0].bn1, torch.nn.GroupNorm)
    assert gn(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet5'.*'resnet50'"):
        create_model("resnet5")
    with pytest.raises(ValueError, match="resnext50_32x4d"):
        create_model("resnext50")


def test_unknown_keyword_raises_with_suggestion():
    with pytest.raises(TypeError, match=r"unknown option 'num_class'.*'num_classes'"):
        create_model("resnet18", num_class=10)
    with pytest.raises(TypeError, match="stem"):
        create_model("resnet20", stem="imagenet")  # the CIFAR family has a fixed stem


def test_duplicate_registration_is_refused():
    from resnetkit.registry import register_model

    with pytest.raises(ValueError, match="already registered"):

        @register_model(family="imagenet", options=())
        def resnet18():  # noqa: F811
            pass


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "resnet9", "densenet121"])
def test_models_export_with_torch_export(name):
    model = create_model(name, num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        assert (program.module()(x) - model(x)).abs().max() <= 1e-5


def test_resnet_traces_with_torchscript():
    model = create_model("resnet18", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace(model, x)
    with torch.no_grad():
        assert (traced(torch.randn(3, 3, 32, 32)).shape) == (3, 4)
        assert (traced(x) - model(x)).abs().max() <= 1e-5

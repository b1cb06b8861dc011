"""Grad-CAM: shapes for every model family, named layers, errors, the overlay, and localisation after training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from resnetkit import create_model
from resnetkit.evaluation.explain import gradcam, overlay


@pytest.fixture(autouse=True)
def one_thread():
    # On a machine shared with other test runs, two intra-op threads spin against each other: one is ~10x faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "layer"),
    [
        ("resnet20", {}, 32, "layer2"),
        ("resnet18", {"stem": "cifar"}, 32, "layer3"),
        ("resnet9", {}, 32, "layer2"),
        ("densenet121", {}, 64, "features.denseblock3"),
    ],
)
def test_gradcam_every_family(name, kwargs, size, layer):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **kwargs).eval()
    images = torch.randn(2, 3, size, size)
    for chosen in (None, layer):
        heat = gradcam(model, images, layer=chosen)
        assert heat.shape == (2, size, size)
        assert heat.min() >= 0 and torch.allclose(heat.flatten(1).amax(1), torch.ones(2))
        assert not heat.requires_grad
    assert not model.training


def test_gradcam_class_idx_layer_and_modes():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=4)
    model.train()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # callers in no-grad mode (a server) still get a heatmap
        per_image = gradcam(model, images, class_idx=[0, 1, 2])
    assert model.training, "gradcam must restore the caller's train/eval mode"
    singles = [gradcam(model, images[i], class_idx=c)[0] for i, c in enumerate([0, 1, 2])]
    torch.testing.assert_close(per_image, torch.stack(singles), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(gradcam(model, images, class_idx=0), gradcam(model, images, class_idx=3))
    # a module used twice per block (the shared ReLU) and an in-place ReLU after the hooked layer both work
    assert gradcam(model, images, layer="layer3.2.relu").shape == (3, 32, 32)
    assert gradcam(model, images, layer="layer3.2.bn2").shape == (3, 32, 32)


def test_gradcam_bad_input_names_the_problem():
    model = create_model("resnet20", num_classes=4)
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="'layer33' not found.*did you mean 'layer3'"):
        gradcam(model, images, layer="layer33")
    with pytest.raises(ValueError, match="out of range"):
        gradcam(model, images, class_idx=4)
    with pytest.raises(ValueError, match="3 entries for 1 images"):
        gradcam(model, images, class_idx=[0, 1, 2])
    with pytest.raises(ValueError, match="not a \\(N, C, H, W\\) feature map"):
        gradcam(model, images, layer="fc")


def test_overlay_blends_heat_at_image_size():
    image = Image.fromarray(np.full((40, 60, 3), 128, dtype=np.uint8))
    heat = torch.zeros(20, 30)
    heat[:10, :15] = 1.0  # top-left quarter hot
    out = overlay(image, heat)
    assert out.size == image.size and out.mode == "RGB"
    pixels = np.asarray(out).astype(int)
    hot, cold = pixels[5, 5], pixels[35, 55]
    assert hot[0] > cold[0] + 50, "jet's hot end is red, its cold end blue"
    assert cold[2] > hot[2] + 50
    tensor_image = torch.full((3, 40, 60), 0.5)
    np.testing.assert_allclose(np.asarray(overlay(tensor_image, heat)), pixels, atol=1)


COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])


def _patch_images(n: int, generator: torch.Generator, size: int = 32, patch: int = 8):
    """Noise images whose only class evidence is one coloured square at a random place; returns its mask too."""
    images = torch.randn(n, 3, size, size, generator=generator) * 0.3
    labels = torch.randint(0, len(COLOURS), (n,), generator=generator)
    corners = torch.randint(0, size - patch + 1, (n, 2), generator=generator)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i, (r, c) in enumerate(corners.tolist()):
        images[i, :, r : r + patch, c : c + patch] = COLOURS[labels[i]][:, None, None]
        masks[i, r : r + patch, c : c + patch] = True
    return images, labels, masks


def test_gradcam_localises_the_class_evidence():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=len(COLOURS))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        images, labels, _ = _patch_images(16, generator)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    images, labels, masks = _patch_images(32, generator)
    with torch.no_grad():
        assert (model(images).argmax(1) == labels).float().mean() > 0.9
    heat = gradcam(model, images, class_idx=labels)
    mass_in_patch = (heat * masks).flatten(1).sum(1) / heat.flatten(1).sum(1)
    area_share = masks.flatten(1).float().mean(1)  # 64 / 1024
    ratio = mass_in_patch / area_share
    assert ratio.median() >= 2.0, f"heatmap mass in the evidence region only {ratio.median():.2f}x its area share"
    assert mass_in_patch.sum() / area_share.sum() >= 2.0

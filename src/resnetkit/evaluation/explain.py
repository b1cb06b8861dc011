"""Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization") for every model in the zoo, and an overlay of the heatmap on the image.

    >>> from resnetkit.evaluation.explain import gradcam, overlay
    >>> heat = gradcam(model, images)                      # (N, H, W) in [0, 1], last stage, predicted class
    >>> heat = gradcam(model, images, class_idx=3, layer="layer3")
    >>> overlay(pil_image, heat[0]).save("cam.png")

    resnetkit explain --checkpoint runs/demo/best.pt photo.jpg --top-k 3 --out explain/
    >>> records = explain_files(load_bundle("runs/demo/best.pt"), ["photo.jpg"], "explain/")
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


def _resolve_layer(model: nn.Module, layer: str) -> nn.Module:
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        stages = [info["name"] for info in getattr(model, "feature_info", [])]
        close = difflib.get_close_matches(layer, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"layer {layer!r} not found in {type(model).__name__}{hint} (stages: {stages})") from None


def _class_indices(class_idx: int | Sequence[int] | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    n, num_classes = logits.shape
    if class_idx is None:
        return logits.argmax(1)
    idx = torch.as_tensor(class_idx, dtype=torch.long, device=logits.device).flatten()
    if idx.numel() == 1:
        idx = idx.expand(n)
    if idx.numel() != n:
        raise ValueError(f"class_idx has {idx.numel()} entries for {n} images")
    if (idx < 0).any() or (idx >= num_classes).any():
        raise ValueError(f"class_idx {idx.tolist()} out of range for a model with {num_classes} classes")
    return idx


def _forward_with_activation(model: nn.Module, x: torch.Tensor, layer: str | None):
    """Logits and the activation Grad-CAM looks at: the last stage's feature map, or the named layer's output."""
    if layer is None:
        features = model.forward_features(x)
        return model.forward_head(features), features

    captured: list[torch.Tensor] = []

    def hook(module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"layer {layer!r} returns {type(output).__name__}, not a feature map")
        captured[:] = [output]  # a module called twice (a block's shared ReLU) keeps its last call
        # Hand a copy downstream, so in-place ops after the layer (ReLU(inplace=True)) leave the captured map intact.
        return output.clone()

    handle = _resolve_layer(model, layer).register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"layer {layer!r} is not used in the forward pass")
    if captured[0].dim() != 4:
        raise ValueError(f"layer {layer!r} outputs shape {tuple(captured[0].shape)}, not a (N, C, H, W) feature map")
    return logits, captured[0]


def gradcam(
    model: nn.Module,
    images: torch.Tensor,
    class_idx: int | Sequence[int] | torch.Tensor | None = None,
    layer: str | None = None,
) -> torch.Tensor:
    """Grad-CAM heatmaps, one per image, at the input resolution: (N, H, W), each scaled so its maximum is 1.

    images: normalised model inputs (N, 3, H, W) (a single (3, H, W) image is accepted too).
    class_idx: the class to explain, per image or for all; None explains each image's predicted class.
    layer: a module name (`model.get_submodule`), e.g. "layer3" or "features.denseblock3"; None uses the last
        stage (`model.forward_features`). A module called more than once per forward keeps its last call.
    The model is run in eval mode (restored afterwards) with gradients on, whatever the caller's grad mode.
    """
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    # The input requires grad so that the graph exists even for a model whose parameters are frozen.
    x = images.detach().clone().float().requires_grad_(True)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            logits, activation = _forward_with_activation(model, x, layer)
            target = _class_indices(class_idx, logits.detach())
            score = logits.gather(1, target[:, None]).sum()
            (grads,) = torch.autograd.grad(score, activation)
    finally:
        model.train(was_training)
    with torch.no_grad():
        weights = grads.mean(dim=(2, 3), keepdim=True)  # global-average-pooled gradients: one weight per channel
        cam = F.relu((weights * activation).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        return (cam / peak).clamp(0, 1).detach()


def _to_rgb_array(image: Image.Image | torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"image must be a PIL image, (3, H, W) or (H, W, 3) array, got shape {array.shape}")
    array = array.astype(np.float32)
    if array.max() > 1.0:
        array = array / 255.0
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def overlay(
    image: Image.Image | torch.Tensor | np.ndarray,
    heatmap: torch.Tensor | np.ndarray,
    alpha: float = 0.5,
    colormap: str = "jet",
) -> Image.Image:
    """The image with the heatmap blended on top in `colormap`, at the image's size (the heatmap is resized).

    image: PIL image, or an un-normalised (3, H, W) / (H, W, 3) array in [0, 1] or [0, 255].
    heatmap: (H, W) in [0, 1], e.g. one entry of `gradcam(...)`.
    """
    import matplotlib

    rgb = _to_rgb_array(image)
    heat = torch.as_tensor(np.asarray(heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor) else heatmap))
    if heat.dim() != 2:
        raise ValueError(f"heatmap must be (H, W), got shape {tuple(heat.shape)}")
    h, w = rgb.shape[:2]
    if tuple(heat.shape) != (h, w):
        heat = F.interpolate(heat[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    heat = heat.clamp(0, 1).numpy()
    colored = matplotlib.colormaps[colormap](heat)[..., :3].astype(np.float32)
    blended = (1 - alpha) * rgb + alpha * colored
    return Image.fromarray((blended.clip(0, 1) * 255).round().astype(np.uint8))


def explain_top_k(
    model: nn.Module,
    image: torch.Tensor,
    preprocess: dict,
    classes: Sequence[str],
    top_k: int = 3,
    layer: str | None = None,
    multilabel: bool = False,
    temperature: float = 1.0,
) -> tuple[Image.Image, list[dict]]:
    """Grad-CAM for the `top_k` most probable classes of one image (multilabel: probabilities are per-class
    sigmoids).

    image: uint8 RGB (3, H, W), as `decode_image` gives it. temperature: the probabilities are softmax(logits / T)
    (a calibrated bundle's `temperature`).
    Returns the image as the model saw it (resized and centre-cropped, un-normalised) and, per class, a dict with
    `class`, `index`, `probability` and `heatmap` ((H, W) at the model's input resolution, aligned with that view).
    """
    from resnetkit.data import eval_transform_from

    x = eval_transform_from(preprocess)(image).unsqueeze(0)
    device = next(model.parameters()).device
    x = x.to(device)
    with torch.no_grad():
        logits = model.eval()(x).float() / temperature
        probs = (logits.sigmoid() if multilabel else logits.softmax(1))[0]
    if len(classes) != probs.numel():
        raise ValueError(f"{len(classes)} class names for a model with {probs.numel()} outputs")
    top = probs.topk(min(top_k, probs.numel()))
    entries = []
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        heat = gradcam(model, x, class_idx=i, layer=layer)[0].cpu()
        entries.append({"class": classes[i], "index": i, "probability": p, "heatmap": heat})
    mean = torch.tensor(preprocess["mean"]).view(3, 1, 1)
    std = torch.tensor(preprocess["std"]).view(3, 1, 1)
    view = (x[0].cpu() * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(view), entries


def plot_explanation(view: Image.Image, entries: list[dict], path, title: str = "", alpha: float = 0.5):
    """One figure: the image, then its overlay for each entry, titled with class and probability. Small inputs
    (32 px) are enlarged to at least 192 px per panel, pixels kept sharp, so the heatmap can be read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = max(view.size)
    scale = max(1, -(-192 // side))  # ceil(192 / side)
    shown = view.resize((view.width * scale, view.height * scale), Image.NEAREST) if scale > 1 else view
    panels = len(entries) + 1
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 3.0), squeeze=False, layout="constrained")
    axes = axes[0]
    axes[0].imshow(shown)
    axes[0].set_title("input", fontsize=10)
    for ax, entry in zip(axes[1:], entries):
        ax.imshow(overlay(shown, entry["heatmap"], alpha=alpha))
        name = entry["class"] if len(entry["class"]) <= 22 else entry["class"][:21] + "…"
        ax.set_title(f"{name}: {entry['probability']:.1%}", fontsize=10)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    from resnetkit.evaluation.figures import save_figure

    return save_figure(fig, path)


def explain_files(
    bundle,
    images: Sequence[str | Path],
    out: str | Path,
    top_k: int = 3,
    layer: str | None = None,
    alpha: float = 0.5,
) -> list[dict]:
    """Per image file, <name>_gradcam.png in `out` (the image as the model sees it, then the overlay of each of the
    top-k classes, titled with class and probability), and explain.json listing them; returns explain.json's
    records. `bundle`: a classifier from `resnetkit.bundle.load_bundle` (a PyTorch one: Grad-CAM needs gradients).
    """
    import json

    from resnetkit.data.image import decode_image

    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if bundle.task != "classification":
        raise ValueError(f"{bundle.source} is a {bundle.task} model: Grad-CAM here explains classifiers")
    paths = [Path(p) for p in images]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, used = [], set()
    for path in paths:
        view, entries = explain_top_k(
            bundle.module,
            decode_image(path),
            bundle.preprocess,
            bundle.classes,
            top_k,
            layer,
            bundle.multilabel,
            bundle.temperature,
        )
        name = f"{path.stem}_gradcam.png"
        if name in used:  # two inputs with the same file name from different folders
            name = f"{path.stem}_{len(used)}_gradcam.png"
        used.add(name)
        plot_explanation(view, entries, out / name, title=path.name, alpha=alpha)
        records.append(
            {
                "image": str(path),
                "output": str(out / name),
                "layer": layer or "last stage",
                "top_k": [{"class": e["class"], "probability": e["probability"]} for e in entries],
            }
        )
    (out / "explain.json").write_text(json.dumps(records, indent=2) + "\n")
    return records

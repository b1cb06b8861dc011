"""A picture of a segmentation checkpoint at work: images of a split, their true masks and the predicted ones, as
colour overlays, with the per-image IoU; prints the table of what it drew.

    .venv/bin/python benchmarks/segmentation_figure.py runs/shapes-r20/best.pt --out docs/img/segmentation.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from resnetkit.bundle import load_bundle  # noqa: E402
from resnetkit.data.image import to_pil  # noqa: E402
from resnetkit.tasks.segmentation import SegmentationMetrics, overlay, predict_masks, segmentation_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", help="default: the checkpoint's")
    parser.add_argument("--split", default="val")
    parser.add_argument("--count", type=int, default=6, help="images to draw")
    parser.add_argument("--scale", type=int, default=3, help="upscale small images for legibility")
    parser.add_argument("--out", default="segmentation.png")
    args = parser.parse_args()

    torch.set_num_threads(1)
    bundle = load_bundle(args.checkpoint)
    model, cfg, classes = bundle.module, bundle.checkpoint["config"], bundle.classes
    data = segmentation_data(args.data or cfg["data"]["name"], args.split, bundle.input_size)
    n = min(args.count, len(data.labels) if hasattr(data, "labels") else len(data))
    fig, axes = plt.subplots(3, n, figsize=(2.1 * n, 6.4), squeeze=False)
    print("| image | true class | IoU of that class | predicted classes |")
    print("|---:|---|---:|---|")
    for i in range(n):
        image_u8, truth = (data.images[i], data.labels[i]) if hasattr(data, "labels") else data[i]
        image = to_pil(image_u8)
        pred = predict_masks(model, [image_u8], bundle.preprocess)[0]
        truth = truth.numpy().astype(np.uint8)
        metrics = SegmentationMetrics(len(classes))
        metrics.update(torch.from_numpy(pred.astype(np.int64))[None], torch.from_numpy(truth.astype(np.int64))[None])
        fg = int(truth.max())
        iou = metrics.compute()["per_class_iou"][fg]
        big = (image.width * args.scale, image.height * args.scale)
        panels = [
            image.resize(big, Image.NEAREST),
            overlay(image, truth, 0.55).resize(big, Image.NEAREST),
            overlay(image, pred, 0.55).resize(big, Image.NEAREST),
        ]
        # Name the class covering most of the predicted foreground; count the others (a stray pixel names a class).
        counts = np.bincount(pred.reshape(-1), minlength=len(classes))[1:]
        order = [int(c) + 1 for c in np.argsort(-counts) if counts[c] > 0]
        predicted = [classes[c] for c in order]
        main = f"{predicted[0]}" + (f" +{len(order) - 1} more" if len(order) > 1 else "") if order else "nothing"
        titles = ["image", f"truth: {classes[fg]}", f"predicted: {main}\nIoU of {classes[fg]}: {iou:.2f}"]
        for row, (panel, title) in enumerate(zip(panels, titles)):
            ax = axes[row, i]
            ax.imshow(panel)
            ax.set_title(title, fontsize=8.5)
            ax.axis("off")
        print(f"| {i} | {classes[fg]} | {iou:.3f} | {', '.join(predicted)} |")
    head, encoder = cfg["segmentation"]["head"], cfg["model"]["name"]
    fig.suptitle(f"{head} on {encoder}: {args.split} images, true masks, predictions", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    with Image.open(args.out) as im:  # a 256-colour PNG: a third of the size, no visible change at this scale
        im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

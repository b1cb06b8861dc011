"""Draw a detector's predictions on test images (ground truth in green), as in docs/img/detection.png, and print
each drawn image's best score and IoU with its ground truth.

    python benchmarks/detection_figure.py runs/detect-cub/best.pt --out docs/img/detection.png
"""

from __future__ import annotations

import argparse

import torch
from torchvision.ops import box_iou
from torchvision.transforms.v2 import functional as F
from torchvision.utils import make_grid

from resnetkit.bundle import load_bundle
from resnetkit.tasks.detection import draw_detections, load_detection_data, predict_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", help="default: the checkpoint's training data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--count", type=int, default=8, help="images drawn, spread evenly over the split")
    parser.add_argument("--height", type=int, default=200, help="height of each tile in pixels")
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("--out", default="detection.png")
    args = parser.parse_args()

    bundle = load_bundle(args.checkpoint)
    model, data_cfg = bundle.module, bundle.checkpoint["config"]["data"]
    data = load_detection_data(
        args.data or data_cfg["name"],
        args.split,
        class_agnostic=data_cfg["class_agnostic"],
        image_size=data_cfg.get("image_size") or 512,  # shapes-multi renders at the detector's size
    )
    picks = torch.linspace(0, len(data) - 1, args.count).round().long().tolist()
    tiles = []
    print(f"{'image':<60} {'score':>6} {'IoU':>6}")
    for i in picks:
        image = data.read_image(i)
        det = predict_batch(model, [image.float() / 255])[0]
        target = data.target(i)
        iou = box_iou(det["boxes"][:1], target["boxes"]).max().item() if len(det["boxes"]) else 0.0
        score = det["scores"][0].item() if len(det["scores"]) else 0.0
        print(f"{data.paths[i].name:<60} {score:6.2f} {iou:6.2f}")
        # Draw at tile size so that line widths and labels come out the same on every tile.
        scale = args.height / image.shape[1]
        size = [args.height, round(image.shape[2] * scale)]
        small = F.resize(image, size, antialias=True)
        det = {**det, "boxes": det["boxes"] * scale}
        target = {**target, "boxes": target["boxes"] * scale}
        tiles.append(draw_detections(small, det, data.classes, args.score_thresh, targets=target))
    width = max(t.shape[2] for t in tiles)
    tiles = [torch.nn.functional.pad(t, (0, width - t.shape[2]), value=255) for t in tiles]
    grid = make_grid(tiles, nrow=4, padding=4, pad_value=255)
    # A 256-colour palette keeps the committed PNG small (photos are otherwise ~1 MB).
    from PIL import Image

    Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).quantize(256).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

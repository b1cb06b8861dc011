"""int8 vs fp32 top-1 agreement on held-out real images, with a model trained here on the CIFAR-10 JPEGs.

    .venv/bin/python benchmarks/int8_agreement.py --epochs 8 --train-per-class 1000 --test-per-class 1000 --threads 1
    .venv/bin/python benchmarks/int8_agreement.py --checkpoint runs/cifar10_fast/best.pt   # a `resnetkit train` model

Trains a CIFAR ResNet (plain loop, CPU) on part of ../shared/data/cifar10-jpg/train, exports it to ONNX,
quantises it to int8 with onnxruntime (QDQ, per-channel weights) calibrated on `--calib` training images, and
compares the int8 model's top-1 class with the fp32 model's on the test split, which calibration never saw.
Prints one table: accuracy of each, and the agreement. `--checkpoint` reuses a model trained by an earlier run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from resnetkit.bundle import load_bundle
from resnetkit.checkpoint import save_checkpoint
from resnetkit.data.image import decode_image
from resnetkit.deploy.export import export_model
from resnetkit.deploy.quantize import quantize_onnx, top1_agreement
from resnetkit.deploy.runtime import OnnxRuntimeModel
from resnetkit.models import create_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpg"
MEAN, STD = [0.4913, 0.4821, 0.4465], [0.2470, 0.2435, 0.2616]  # training-set means (data README), CIFAR stds


def load_split(root: Path, split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first `per_class` images of each class as uint8 (N, 3, 32, 32), with labels and class names."""
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted((root / split / name).glob("*.jpg"))[:per_class]
        for f in files:
            images.append(decode_image(f))
            labels.append(label)
    x = torch.stack(images)
    return x, torch.tensor(labels), classes


def normalise(x: torch.Tensor, mean: list[float] = MEAN, std: list[float] = STD) -> torch.Tensor:
    mean_, std_ = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (x.float() / 255 - mean_) / std_


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with 4 px of reflection padding and horizontal flips, on a whole uint8 batch."""
    n = x.shape[0]
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2,), generator=generator).tolist()  # one offset per batch: cheap, still varied
    x = padded[:, :, dy : dy + 32, dx : dx + 32]
    flip = torch.rand(n, generator=generator) < 0.5
    x[flip] = x[flip].flip(3)
    return x


def train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, batch: int) -> None:
    generator = torch.Generator().manual_seed(0)
    steps = epochs * (len(images) // batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps, pct_start=0.25)
    model.train()
    step, start = 0, time.time()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for i in range(len(images) // batch):
            idx = order[i * batch : (i + 1) * batch]
            x = normalise(augment(images[idx], generator)).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, {time.time() - start:.0f}s", flush=True)
    model.eval()


def logits_of(call, x: torch.Tensor, preprocess: dict, batch: int = 250) -> torch.Tensor:
    mean, std = preprocess["mean"], preprocess["std"]
    with torch.inference_mode():
        return torch.cat([call(normalise(x[i : i + batch], mean, std)) for i in range(0, len(x), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--train-per-class", type=int, default=1000, help="training images per class (max 5000)")
    parser.add_argument("--test-per-class", type=int, default=1000, help="test images per class (max 1000)")
    parser.add_argument("--calib", type=int, default=512, help="calibration images, from the training split")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a crowded machine)")
    parser.add_argument("--method", default="minmax", help="calibration: minmax, percentile or entropy")
    parser.add_argument("--fp32-ends", action="store_true", help="keep the first conv and the classifier in fp32")
    parser.add_argument("--ops", default=None, help="quantise only these ONNX op types, e.g. Conv,Gemm")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="use this model instead of training one: a checkpoint of this script or of `resnetkit train` on the "
        "CIFAR-10 JPEGs (its model, mean and std are used)",
    )
    parser.add_argument("--save", type=Path, default=Path(tempfile.gettempdir()) / "int8_agreement.pt")
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        raise SystemExit(f"CIFAR-10 JPEGs not found at {args.data} (see ../shared/data/README.md)")

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.time()
    train_x, train_y, classes = load_split(args.data, "train", args.train_per_class)
    test_x, test_y, _ = load_split(args.data, "test", args.test_per_class)
    print(f"loaded {len(train_x)} train and {len(test_x)} test images in {time.time() - start:.0f}s", flush=True)
    preprocess = {"preset": "cifar", "input_size": 32, "resize": 32, "mean": MEAN, "std": STD}

    if args.checkpoint:
        bundle = load_bundle(args.checkpoint)
        model, ckpt = bundle.module, bundle.checkpoint
        if ckpt.get("classes") != classes:
            raise SystemExit(f"{args.checkpoint}: its classes {ckpt.get('classes')} are not CIFAR-10's {classes}")
        preprocess, args.model, args.epochs = ckpt["preprocess"], ckpt["model_name"], ckpt.get("epoch", "?")
    else:
        model = create_model(args.model, num_classes=len(classes))
        train(model, train_x, train_y, args.epochs, args.batch)
        save_checkpoint(
            args.save,
            {
                "model": model.state_dict(),
                "model_name": args.model,
                "classes": classes,
                "model_kwargs": {"num_classes": len(classes)},
                "preprocess": preprocess,
                "epoch": args.epochs,
            },
        )
        print(f"trained in {time.time() - start:.0f}s; checkpoint {args.save}", flush=True)

    # Calibration: a spread of training images (every k-th, so every class is in), never the test split.
    calib_idx = torch.linspace(0, len(train_x) - 1, args.calib).long()
    mean, std = preprocess["mean"], preprocess["std"]
    calibration = [normalise(train_x[calib_idx[i : i + 64]], mean, std) for i in range(0, args.calib, 64)]
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, int8_path = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        report = export_model(model, fp32_path, "onnx", preprocess, classes, model_name=args.model)
        quantize_onnx(
            fp32_path,
            int8_path,
            calibration,
            method=args.method,
            fp32_ends=args.fp32_ends,
            op_types=args.ops.split(",") if args.ops else None,
        )
        fp32_ort, int8_ort = OnnxRuntimeModel(fp32_path), OnnxRuntimeModel(int8_path)
        eager = logits_of(model, test_x, preprocess)
        fp32 = logits_of(fp32_ort, test_x, preprocess)
        int8 = logits_of(int8_ort, test_x, preprocess)

    def accuracy(logits: torch.Tensor) -> float:
        return (logits.argmax(1) == test_y).float().mean().item()

    n = len(test_x)
    source = f"from {args.checkpoint}" if args.checkpoint else f"trained on {len(train_x)} CIFAR-10 JPEGs"
    print(
        f"\n{args.model} {source} ({args.epochs} epochs), int8 calibrated on {args.calib} training images, "
        f"compared on {n} test images"
    )
    ends = ", first conv and classifier kept in fp32" if args.fp32_ends else ""
    ends += f", only {args.ops} quantised" if args.ops else ""
    print(f"int8 calibration: {args.method}{ends}; ONNX export max |onnx - eager| = {report.max_abs_diff:.2e}\n")
    print("| model | top-1 accuracy | top-1 agreement with fp32 |")
    print("|---|---:|---:|")
    print(f"| fp32 eager (PyTorch) | {100 * accuracy(eager):.2f}% | (reference) |")
    print(f"| fp32 onnxruntime | {100 * accuracy(fp32):.2f}% | {100 * top1_agreement(eager, fp32):.2f}% |")
    agreement = top1_agreement(eager, int8)
    print(f"| int8 onnxruntime (QDQ, per-channel) | {100 * accuracy(int8):.2f}% | {100 * agreement:.2f}% |")
    # Where do they disagree? The fp32 margin between the top two softmax probabilities, on those images vs all.
    top2 = eager.softmax(1).topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    differ = eager.argmax(1) != int8.argmax(1)
    if differ.any():
        print(
            f"\nfp32 top-1 minus top-2 probability: median {margin.median():.3f} over all images, "
            f"{margin[differ].median():.3f} (max {margin[differ].max():.3f}) over the {int(differ.sum())} "
            "that differ"
        )
    print(
        f"\nint8 vs fp32 top-1 agreement: {100 * agreement:.2f}% on {n} held-out images "
        f"({round((1 - agreement) * n)} disagree); target >= 99%: {'met' if agreement >= 0.99 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()

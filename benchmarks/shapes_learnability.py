"""Is `shapes` learnable? A CIFAR ResNet trained briefly on the CPU, test accuracy printed after every epoch.

    .venv/bin/python benchmarks/shapes_learnability.py --model resnet20 --epochs 8 --data shapes:5000 --batch-size 64

Plain PyTorch on purpose (one-cycle SGD with Nesterov, label smoothing 0.1): it checks the data, not the trainer.
"""

from __future__ import annotations

import argparse
import time

import torch

import resnetkit
from resnetkit.data import build_loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--data", default="shapes:5000")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train = build_loader(args.data, "train", preset="cifar", batch_size=args.batch_size, train=True, device="cpu")
    test = build_loader(args.data, "test", preset="cifar", batch_size=500, train=False, device="cpu")
    model = resnetkit.create_model(args.model, num_classes=len(train.classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.2, total_steps=args.epochs * len(train), pct_start=0.25)
    start = time.time()
    print("| epoch | train loss | test accuracy | seconds |\n|---:|---:|---:|---:|")
    for epoch in range(args.epochs):
        model.train()
        train.set_epoch(epoch)
        for images, labels in train:
            loss = torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in test:
                correct += (model(images).argmax(1) == labels).sum().item()
        print(f"| {epoch} | {loss.item():.3f} | {correct / test.num_samples:.4f} | {time.time() - start:.0f} |")


if __name__ == "__main__":
    main()

"""The CPU inference engine: BN folding, the optimised path, onnxruntime, int8, and `resnetkit bench infer`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_export import trained_looking  # BN statistics that make folding matter

from resnetkit.cli import main
from resnetkit.deploy.engine import fold_batchnorm, optimize_for_cpu
from resnetkit.deploy.export import export_model
from resnetkit.deploy.quantize import quantize_model, top1_agreement
from resnetkit.deploy.runtime import OnnxRuntimeModel
from resnetkit.models import BasicBlock, create_model


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("name, size", [("resnet18", 32), ("resnet20", 32)])
def test_fold_batchnorm_keeps_outputs_and_leaves_original_alone(name, size):
    model = trained_looking(create_model(name, num_classes=7))
    folded = fold_batchnorm(model)
    assert count(folded, nn.BatchNorm2d) == 0 and count(model, nn.BatchNorm2d) > 0
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        assert (folded(x) - expected).abs().max().item() <= 1e-4
        fast = optimize_for_cpu(model)
        assert (fast(x) - expected).abs().max().item() <= 1e-4
    kernels = [m.weight for m in fast.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert kernels and all(w.is_contiguous(memory_format=torch.channels_last) for w in kernels)
    assert not kernels[0].is_contiguous()  # really NHWC, not NCHW


def miniature_resnet(num_classes: int) -> nn.Sequential:
    """A ResNet in miniature (stem, one residual block, head): the same Conv/BN/ReLU/Add/Gemm ops as the zoo
    models, cheap enough to compile or train in seconds."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        BasicBlock(8, 8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def test_compiled_path_matches_eager():
    # A miniature ResNet keeps Inductor's C++ compilation to seconds; the zoo models compile the same graph ops.
    model = trained_looking(miniature_resnet(5))
    compiled = optimize_for_cpu(model, compile=True)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max().item() <= 1e-4
    assert count(model, nn.BatchNorm2d) == 3  # the original is untouched


def test_fold_batchnorm_keeps_a_bn_that_follows_no_conv():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    trained_looking(model)
    folded = fold_batchnorm(model)
    assert count(folded, nn.BatchNorm2d) == 1  # the pre-activation BN stays, the conv's BN is folded
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max().item() <= 1e-5


def test_onnxruntime_model_takes_tensors_and_arrays_at_any_batch(tmp_path):
    model = trained_looking(create_model("resnet20", num_classes=4))
    export_model(model, tmp_path / "m.onnx", "onnx", {"input_size": 32, "mean": [0.5] * 3, "std": [0.2] * 3})
    engine = OnnxRuntimeModel(tmp_path / "m.onnx", threads=1)
    x = torch.randn(5, 3, 32, 32)
    from_tensor, from_array = engine(x), engine(x.numpy().astype(np.float64))
    assert isinstance(from_tensor, torch.Tensor) and from_tensor.shape == (5, 4)
    assert torch.equal(from_tensor, from_array)
    with torch.no_grad():
        assert (from_tensor - model(x)).abs().max().item() <= 1e-4
    assert engine.preprocess["input_size"] == 32 and engine.classes is None


def test_optimize_for_cpu_on_onnxruntime_matches_eager():
    model = trained_looking(create_model("resnet18", num_classes=6))
    fast = optimize_for_cpu(model, backend="onnxruntime", input_size=32, threads=1)
    assert isinstance(fast, OnnxRuntimeModel)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max().item() <= 1e-4
    assert count(model, nn.BatchNorm2d) > 0  # the original is untouched
    with pytest.raises(ValueError, match="needs input_size"):
        optimize_for_cpu(model, backend="onnxruntime")
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        optimize_for_cpu(model, backend="tensorrt")


def test_onnxruntime_model_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ONNX model not found: .*nothing.onnx"):
        OnnxRuntimeModel(tmp_path / "nothing.onnx")


def separable(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: dark noisy images, class 1: bright ones; the class is the sign of the mean pixel."""
    labels = torch.arange(n) % 2
    images = torch.randn(n, 3, 16, 16, generator=generator) * 0.5 + (labels.float() * 2 - 1).view(-1, 1, 1, 1)
    return images, labels


def train_briefly(model: nn.Module, batches) -> None:
    """SGD (lr 0.05, momentum 0.9) over `batches` of (images, labels) on one thread, then eval mode: ops this small
    only pay thread synchronisation for a second thread."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for images, labels in batches:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def test_int8_agrees_with_fp32_on_a_separable_task(tmp_path):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = miniature_resnet(2)
    train_briefly(model, (separable(32, generator) for _ in range(20)))
    calibration = [separable(32, generator)[0] for _ in range(2)]
    held_out, labels = separable(64, generator)  # disjoint from the calibration images
    with torch.no_grad():
        fp32 = model(held_out)
    assert (fp32.argmax(1) == labels).float().mean().item() >= 0.95, "fp32 model failed to learn the easy task"

    int8 = quantize_model(model, calibration, tmp_path / "m.int8.onnx", {"input_size": 16}, ["dark", "bright"])
    quantized = int8(held_out)
    assert int8.classes == ["dark", "bright"]
    assert top1_agreement(fp32, quantized) >= 0.98
    assert (quantized - fp32).abs().max().item() > 0  # really quantised, not the fp32 graph again
    import onnx

    ops = {node.op_type for node in onnx.load(str(tmp_path / "m.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_top1_agreement():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    b = torch.tensor([[0.9, 0.1], [1.0, 0.0], [3.0, 1.0], [0.0, 1.0]])
    assert top1_agreement(a, b) == 0.75
    with pytest.raises(ValueError, match="shapes differ"):
        top1_agreement(a, b[:3])


def test_bench_infer_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "infer", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--batch-size", "--iters", "--backends"):
        assert option in out


def test_bench_infer_prints_one_table_with_every_backend(capsys):
    argv = [
        "bench",
        "infer",
        "--model",
        "resnet18",
        "--batch-size",
        "1",
        "--iters",
        "1",
        "--input-size",
        "32",
        "--markdown",
        "--gemm-size",
        "512",
        "--min-seconds",
        "0",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ") and "| 1 |" in line]
    assert [line.split("|")[1].strip() for line in table] == [
        "torchvision eager",
        "resnetkit eager",
        "resnetkit optimised",
        "resnetkit onnxruntime",
        "onnxruntime default",
        "int8",
    ]
    assert table[0].split("|")[5].strip() == "1.00x"  # the baseline's ratio to itself
    for line in table:
        images_per_s, roofline = float(line.split("|")[3]), line.split("|")[6].strip()
        assert images_per_s > 0 and roofline.endswith("%")
        assert line.split("|")[7].strip() == "1"  # --iters 1 and --min-seconds 0: one timed call per row
    assert "GEMM roofline" in out and "x torchvision eager" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "one"], "--batch-size wants comma-separated integers"),
        (["--model", "resnet51"], "unknown model 'resnet51'"),
        (["--backends", "tensorrt"], "unknown backend"),
    ],
)
def test_bench_infer_bad_input(capsys, argv, message):
    assert main(["bench", "infer", *argv]) == 2
    assert message in capsys.readouterr().err


def test_quantize_command_on_real_photos(tmp_path, cifar10_jpg, capsys):
    """`resnetkit quantize`: a ResNet-20 trained briefly on two CIFAR-10 classes (real JPEGs), calibrated on some
    photos; the agreement it reports is recomputed here, independently, on the same held-out photos."""
    import json

    from resnetkit.bundle import Bundle
    from resnetkit.checkpoint import save_checkpoint
    from resnetkit.data.image import decode_image
    from resnetkit.deploy.predict import Predictor
    from resnetkit.deploy.quantize import calibration_split

    torch.manual_seed(0)
    classes = ["airplane", "frog"]
    preprocess = {
        "preset": "cifar",
        "input_size": 32,
        "resize": 32,
        "mean": [0.49, 0.48, 0.45],
        "std": [0.25, 0.24, 0.26],
    }
    model = create_model("resnet20", num_classes=2)
    train_files = [f for label in classes for f in sorted((cifar10_jpg / "train" / label).glob("*.jpg"))[:300]]
    predictor = Predictor(Bundle(model, preprocess, classes, "resnet20"))
    images = predictor.to_tensor([decode_image(f) for f in train_files])
    labels = torch.tensor([classes.index(f.parent.name) for f in train_files])
    train_briefly(model, ((images[i], labels[i]) for _ in range(3) for i in torch.randperm(len(images)).split(50)))
    checkpoint = tmp_path / "best.pt"
    save_checkpoint(
        checkpoint,
        {
            "model": model.state_dict(),
            "model_name": "resnet20",
            "model_kwargs": {"num_classes": 2},
            "classes": classes,
            "preprocess": preprocess,
        },
    )
    folders = [str(cifar10_jpg / "test" / label) for label in classes]  # 2,000 photos the model never saw
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "model.int8.onnx"
    argv = ["quantize", "--checkpoint", str(checkpoint), "--images", *folders, "--out", str(out)]
    assert main([*argv, "--calib", "64", "--check", "300"]) == 0
    printed = capsys.readouterr().out
    assert "int8 vs fp32 top-1 agreement" in printed and str(out) in printed

    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["classes"] == classes and meta["preprocess"] == preprocess
    info = meta["int8"]
    assert (info["calibration_images"], info["check_images"], info["method"]) == (64, 300, "minmax")
    # The same held-out photos, scored here by the eager model and the written int8 file.
    from resnetkit.data.image import list_images

    _, check_files = calibration_split(list_images(folders), 64, 300)
    x = predictor.to_tensor([decode_image(f) for f in check_files])
    int8 = OnnxRuntimeModel(out, threads=1)
    with torch.no_grad():
        fp32 = model(x)
    assert int8.classes == classes
    assert info["top1_agreement_with_fp32"] == pytest.approx(top1_agreement(fp32, int8(x)))
    assert info["top1_agreement_with_fp32"] >= 0.9
    truth = torch.tensor([classes.index(f.parent.name) for f in check_files])
    assert (fp32.argmax(1) == truth).float().mean().item() >= 0.75, "the model did not learn airplane vs frog"

    # Unreadable files are skipped and counted; too few images and a failed --min-agreement are clear.
    few = [str(f) for f in sorted((cifar10_jpg / "test" / "frog").glob("*.jpg"))[:40]]
    assert main([*argv, "--images", str(tmp_path / "junk"), *few, "--calib", "16", "--check", "30"]) == 0
    printed = capsys.readouterr().out  # all 41 files are used, so the broken one is met
    assert "skipped 1 unreadable file(s), e.g. " in printed and "broken.jpg" in printed
    assert main([*argv, "--calib", "5000"]) == 2
    assert "found 2000 images; int8 needs more than the 5000 calibration images" in capsys.readouterr().err
    assert main([*argv, "--calib", "16", "--check", "20", "--min-agreement", "1.5"]) == 2
    assert "--min-agreement is a fraction" in capsys.readouterr().err

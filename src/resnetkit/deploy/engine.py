"""Fast CPU inference: BatchNorm folded into the convolutions, channels_last, inference mode; and onnxruntime.

    >>> fast = optimize_for_cpu(model)            # same logits as model(x) within 1e-4; 1.1-2x eager (BENCHMARKS.md)
    >>> fastest = optimize_for_cpu(model, backend="onnxruntime", input_size=224)  # ~3x torchvision eager
    >>> logits = fast(images)                     # float NCHW batch in, logits out
    >>> ort_model = OnnxRuntimeModel("model.onnx")  # from `resnetkit export --format onnx`
    >>> logits = ort_model(images)                # same call, a torch tensor back

Why these steps: in eval mode a BatchNorm is a per-channel affine map, so it folds exactly into the weights and bias
of the convolution before it (one pass over the activations saved per BN). oneDNN's convolutions run fastest on
NHWC ("channels_last") tensors; with NCHW inputs PyTorch reorders every activation before and after each conv.
`torch.inference_mode` skips autograd's version counters and view tracking.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from resnetkit.deploy.runtime import OnnxRuntimeModel


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` (in eval mode) with every BatchNorm that directly follows a convolution folded into it.

    Traces the model with torch.fx and folds each `conv -> bn` edge where the BN is the conv's only user; BNs that
    follow something else (DenseNet's pre-activation BN-ReLU-conv) are kept as they are. Models that torch.fx cannot
    trace fall back to folding `convN`/`bnN` attribute pairs (torchvision's naming) by module surgery.
    """
    model = copy.deepcopy(model).eval()
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception:  # data-dependent control flow: fold the attribute pairs we can find instead
        return _fold_named_pairs(model)
    modules = dict(graph_module.named_modules())
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        conv_node = node.args[0]
        if not (isinstance(conv_node, torch.fx.Node) and conv_node.op == "call_module"):
            continue
        conv, bn = modules[conv_node.target], modules[node.target]
        if not isinstance(conv, nn.Conv2d) or len(conv_node.users) > 1 or not bn.track_running_stats:
            continue
        fused = fuse_conv_bn_eval(conv, bn)
        _set_submodule(graph_module, conv_node.target, fused)
        modules[conv_node.target] = fused
        node.replace_all_uses_with(conv_node)
        graph_module.graph.erase_node(node)
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module


def _fold_named_pairs(model: nn.Module) -> nn.Module:
    for module in model.modules():
        for name, child in list(module.named_children()):
            if name.startswith("bn") and isinstance(child, nn.BatchNorm2d):
                conv = getattr(module, "conv" + name[2:], None)
                if isinstance(conv, nn.Conv2d):
                    setattr(module, "conv" + name[2:], fuse_conv_bn_eval(conv, child))
                    setattr(module, name, nn.Identity())
    return model


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class OptimizedModel(nn.Module):
    """Wraps a BN-folded channels_last model: takes any float NCHW batch, runs it in inference mode.

    With `compiled=True` the model is a torch.compile'd one, run with Inductor's freezing on: weights become
    constants, so Inductor pre-packs them for oneDNN and fuses conv + bias + ReLU (+ residual add) into one kernel.
    Each new batch size compiles once (about a minute for ResNet-50 on 2 cores).
    """

    def __init__(self, model: nn.Module, compiled: bool = False) -> None:
        super().__init__()
        self.model = model
        self.compiled = compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if not self.compiled:
            with torch.inference_mode():
                return self.model(x)
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.model(x)


def optimize_for_cpu(
    model: nn.Module,
    compile: bool = False,
    backend: str = "torch",
    input_size: int | None = None,
    threads: int | None = None,
) -> OptimizedModel | OnnxRuntimeModel:
    """The fast fp32 CPU path. Returns a new callable (the original model is untouched) whose logits match
    `model.eval()(x)` within 1e-4.

    backend="torch": BN folded, channels_last, inference mode; `compile=True` adds torch.compile (the fastest torch
    variant, but it compiles once per batch size). backend="onnxruntime": the model exported to ONNX (verified
    against eager) and run by onnxruntime with every graph optimisation, which folds BN itself and runs the
    convolutions in its blocked NCHWc layout; the fastest fp32 path measured here (BENCHMARKS.md). It needs
    `input_size` (the exported graph has a dynamic batch but fixed height and width) and uses `threads` threads.
    """
    if backend == "onnxruntime":
        if input_size is None:
            raise ValueError("optimize_for_cpu(backend='onnxruntime') needs input_size (e.g. 224)")
        return _onnxruntime_model(model, input_size, threads)
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}; choose 'torch' or 'onnxruntime'")
    folded = fold_batchnorm(model).to(memory_format=torch.channels_last)
    if compile:
        folded = torch.compile(folded, dynamic=False)
    return OptimizedModel(folded, compiled=compile).eval()


def _onnxruntime_model(model: nn.Module, input_size: int, threads: int | None) -> OnnxRuntimeModel:
    import tempfile

    from resnetkit.deploy.export import export_model

    with tempfile.TemporaryDirectory() as tmp:  # the session holds the graph in memory: the file can go
        path = Path(tmp) / "model.onnx"
        export_model(model, path, "onnx", {"input_size": input_size})
        return OnnxRuntimeModel(path, threads=threads)

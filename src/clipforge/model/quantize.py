"""int8 inference on CPU: every linear layer of both towers with int8 weights (one scale per output channel)
and int8 activations quantised on each call (PyTorch's dynamic quantisation; its x86 kernels use the CPU's
int8 dot-product units, AVX-512 VNNI where present). Convolutions, layer norms, attention scores and the
final projections stay fp32, so a ResNet image tower gains little: its time is in its convolutions.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from clipforge.errors import ConfigError
from clipforge.model.transformer import Attention

MODES = ("int8",)
TOWERS = ("image", "text")


def _dynamic_int8(linear: nn.Linear) -> nn.Module:
    """The int8 twin of an fp32 nn.Linear (weights quantised per output channel, activations per call)."""
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao: same kernels here
        warnings.simplefilter("ignore")
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        linear.qconfig = per_channel_dynamic_qconfig
        return DynamicLinear.from_float(linear)


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0])
    out.weight.data, out.bias.data = weight.detach().float().clone(), bias.detach().float().clone()
    return out


class Int8Attention(Attention):
    """Attention whose fused q/k/v and output projections run int8; scores and softmax stay fp32."""

    def __init__(self, source: Attention) -> None:
        nn.Module.__init__(self)  # not Attention.__init__: its fp32 projection weights are not kept
        self.heads = source.heads
        width = source.out_proj.in_features
        weight, bias = source.in_proj_weight, source.in_proj_bias
        self.qkv = nn.ModuleDict({
            "all": _dynamic_int8(_linear(weight, bias)),
            "q": _dynamic_int8(_linear(weight[:width], bias[:width])),  # the ViT's last block: class token only
            "kv": _dynamic_int8(_linear(weight[width:], bias[width:])),
        })
        self.out_proj = _dynamic_int8(source.out_proj)

    def project(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        part = "all" if rows.start is None and rows.stop is None else "q" if rows.start is None else "kv"
        return self.qkv[part](x)


def quantize(model: nn.Module, mode: str = "int8", towers: tuple[str, ...] = TOWERS) -> nn.Module:
    """A copy of a CLIP for CPU inference with int8 linear layers; same encode_image / encode_text / forward.

    `towers` picks which run int8: ("image",) keeps text fp32, for a zero-shot classifier whose class
    embeddings are computed once while every image pays the image tower.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown quantisation mode {mode!r}: use one of {', '.join(MODES)}")
    if not towers or set(towers) - set(TOWERS):
        raise ConfigError(f"towers must name some of {', '.join(TOWERS)}, got {towers!r}")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ConfigError("int8 quantisation runs on CPU kernels: move the model to the CPU first (model.cpu())")
    quantized = copy.deepcopy(model).float().eval()
    for tower in towers:
        _quantize_linears(quantized.visual if tower == "image" else quantized.text_tower)
    quantized.quantized = mode  # save_pretrained refuses it: int8 weights are not a checkpoint format
    for param in quantized.parameters():
        param.requires_grad_(False)
    return quantized


def _quantize_linears(root: nn.Module) -> None:
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Attention):
                setattr(parent, name, Int8Attention(child))
            elif type(child) is nn.Linear:
                setattr(parent, name, _dynamic_int8(child))

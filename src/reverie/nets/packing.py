"""Inference on the CPU with weights reordered once: oneDNN's blocked layouts for 2-D convolutions and Linears.

PyTorch's CPU convolution and bf16 Linear hand plain weights to oneDNN, which reorders each weight into the
blocked layout its AMX / AVX-512 kernels read, at every call. Where the activations are small next to the
weights (the SD U-Net's 1280-channel levels at 16x16 and 8x8 latents, 26 MB GEGLU projections on 512 tokens),
that reorder is a large part of the call: a 3x3 1280-channel convolution at 8x8 took 10.0 ms plain and 4.7 ms
with its weight reordered beforehand (one thread, bf16). :func:`pack_weights` reorders every weight once, at the
layer's first call, and runs the layer through oneDNN's own ops (``torch.ops.mkldnn._convolution_pointwise``,
``_linear_pointwise``, the ones inductor's freezing pass uses) from then on: the same arithmetic, the same
numbers bit for bit (checked in the tests, also at input sizes other than the one a weight was packed for).
Measured on the full SD 1.5 U-Net (bf16, channels_last, 512 px, one guided step, one thread): 3.8 s -> 3.25 s.

Inference only: a layer falls back to its plain forward when gradients are wanted, and on other devices and
dtypes than its weight's own; a weight replaced or written in place is packed again at its next call.
``Pipeline.compile`` unpacks first (:func:`unpack_weights`): inductor traces plain layers. The packed copies
add the weights' size again in memory (the plain parameters stay, for ``state_dict`` and all that reads them).
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import Tensor, nn

__all__ = ["pack_weights", "unpack_weights", "is_packed", "packing_available"]

# layer -> (key of the weight it was made from, reordered weight). Kept beside the layers, not on them, so that
# deepcopy and state_dict see plain modules (oneDNN's opaque tensors have no storage to copy); a copy packs anew.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packing_available() -> bool:
    """Whether this PyTorch build has oneDNN's CPU ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def is_packed(layer: nn.Module) -> bool:
    """Whether ``layer`` runs through :func:`pack_weights`' path."""
    forward = layer.__dict__.get("forward")
    return getattr(forward, "__func__", None) in (_conv_forward, _linear_forward)


def _usable(layer: nn.Module, x: Tensor) -> bool:
    w = layer.weight
    return (x.device.type == "cpu" and x.dtype == w.dtype and not (torch.is_grad_enabled() and (
        w.requires_grad or x.requires_grad)))


def _packed(layer: nn.Module, pack) -> Tensor:
    """The layer's reordered weight, made again when the weight is another tensor or was written in place since."""
    w = layer.weight
    key = (w.data_ptr(), w.dtype, w._version)
    found = _PACKED.get(layer)
    if found is None or found[0] != key:
        found = _PACKED[layer] = (key, pack(w))
    return found[1]


def _conv_forward(self: nn.Conv2d, x: Tensor) -> Tensor:
    if not _usable(self, x) or x.ndim != 4:
        return type(self).forward(self, x)
    geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
    weight = _packed(self, lambda w: torch.ops.mkldnn._reorder_convolution_weight(w, *geometry, list(x.shape)))
    return torch.ops.mkldnn._convolution_pointwise(x, weight, self.bias, *geometry, "none", [], "")


def _linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    if not _usable(self, x):
        return type(self).forward(self, x)
    rows = x.reshape(-1, x.shape[-1])
    weight = _packed(self, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows.shape[0]))
    out = torch.ops.mkldnn._linear_pointwise(rows, weight, self.bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def pack_weights(module: nn.Module, dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)) -> int:
    """Route every ``nn.Conv2d`` (zero padding) and ``nn.Linear`` of ``module`` whose weights are on the CPU in one
    of ``dtypes`` through oneDNN with its weight reordered once, at its first call (module docstring); the number
    of layers routed (0 without oneDNN). Call it when the weights are final: after loading, casting and
    ``channels_last``."""
    if not packing_available():
        return 0
    count = 0
    for layer in module.modules():
        if type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and isinstance(layer.padding, tuple):
            forward = _conv_forward
        elif type(layer) is nn.Linear:
            forward = _linear_forward
        else:
            continue
        if is_packed(layer) or layer.weight.device.type != "cpu" or layer.weight.dtype not in dtypes:
            continue
        layer.forward = types.MethodType(forward, layer)
        count += 1
    return count


def unpack_weights(module: nn.Module) -> int:
    """Undo :func:`pack_weights` (plain layers, packed copies freed); the number of layers restored."""
    count = 0
    for layer in module.modules():
        if is_packed(layer):
            del layer.forward
            _PACKED.pop(layer, None)
            count += 1
    return count

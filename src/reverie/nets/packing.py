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
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["pack_weights", "unpack_weights", "is_packed", "packing_available", "linear", "geglu"]

# layer -> (key of the weight it was made from, reordered weight). Kept beside the layers, not on them, so that
# deepcopy and state_dict see plain modules (oneDNN's opaque tensors have no storage to copy); a copy packs anew.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_HALVES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # GEGLU projections: the two halves apart


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


def _key(w: Tensor) -> tuple:
    """What identifies a weight's values: its memory, dtype and in-place writes (inference tensors, made under
    ``torch.inference_mode``, count no writes)."""
    return w.data_ptr(), w.dtype, 0 if w.is_inference() else w._version


def _packed(layer: nn.Module, pack) -> Tensor:
    """The layer's reordered weight, made again when the weight is another tensor or was written in place since."""
    w = layer.weight
    key = _key(w)
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


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def linear(layer: nn.Linear, x: Tensor, add: Tensor | None = None) -> Tensor:
    """``layer(x) + add``, the addition done by the GEMM's epilogue when ``layer`` is packed (one pass over the
    output fewer); otherwise added in place."""
    if add is None or not (is_packed(layer) and _usable(layer, x)) or add.dtype != x.dtype:
        out = layer(x)
        return out if add is None else out.add_(add)
    rows = _rows(x)
    weight = _packed(layer, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows.shape[0]))
    out = torch.ops.mkldnn._linear_pointwise.binary(rows, _rows(add), weight, layer.bias, "add")
    return out.view(*x.shape[:-1], out.shape[-1])


def geglu(proj: nn.Linear, x: Tensor) -> Tensor:
    """``a * gelu(b)`` with ``[a, b] = proj(x)`` (Shazeer 2020, eq. 6). Packed: two GEMMs over the halves of the
    weight, the first with GELU (erf) as its epilogue, the second multiplying by it in its own; no full-width
    intermediate is written and read again (at SD's 64x64 level: 58 -> 26 ms with the output Linear, one
    thread). Rounds once where the plain path rounds the GELU's input and output to bf16 apart."""
    if not (is_packed(proj) and _usable(proj, x)):
        a, b = proj(x).chunk(2, dim=-1)
        return F.gelu(b).mul_(a)
    rows = _rows(x)
    w = proj.weight
    key = _key(w)
    found = _HALVES.get(proj)
    if found is None or found[0] != key:
        half = w.shape[0] // 2
        bias = proj.bias if proj.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        found = _HALVES[proj] = (key, [(torch.ops.mkldnn._reorder_linear_weight(part.contiguous(), rows.shape[0]),
                                        bias_part.contiguous())
                                       for part, bias_part in ((w[:half], bias[:half]), (w[half:], bias[half:]))])
    (wa, ba), (wb, bb) = found[1]
    gate = torch.ops.mkldnn._linear_pointwise(rows, wb, bb, "gelu", [], "none")
    out = torch.ops.mkldnn._linear_pointwise.binary(rows, gate, wa, ba, "mul")
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
            _HALVES.pop(layer, None)
            count += 1
    return count

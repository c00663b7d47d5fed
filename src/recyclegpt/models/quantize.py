"""Weight-only int8 products on the CPU (`quantize_int8_`, `--quantize int8`).

Every product weight of a model gets an int8 form (`Int8Weight`): per output channel (row) a bfloat16 scale
s = max|w_row| / 127 and values q = round(w / s) clamped to [-127, 127]. A product then casts its activations to
bfloat16 and runs `torch.ops.aten._weight_int8pack_mm` (fp32 accumulation of x · q·s, rounded to bfloat16),
and casts the result back to the activations' dtype. On a decode step's few rows that streams a quarter of the
float32 weights' bytes and measures 2-3x faster than F.linear in float32 (docs/cpu.md). It is another model: its
tokens are not float32's, so it is its own reference (the lossless strategies reproduce its own `standard`).

The kernel computes each output element on its own (one fp32 dot product, then the scale and one rounding), so a
row's result does not depend on how many rows share the call: a verification of k tokens gives the same values as
k one-row steps, which keeps the lossless strategies exact. Where the kernel is missing (a torch without it) or
cannot take a shape (input widths that are not a multiple of 16), the product runs as F.linear in float32 against
the dequantised weight, with the activations rounded to bfloat16 before and the result after, as the kernel does;
its sums run in BLAS's order, so values can differ from the kernel's in the last bit.

The float weights stay (state dicts, the embedding's lookups, training); the int8 forms are derived buffers,
outside the state dict, as the fused matrices of `fuse_projections` are: quantise again after changing weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .transformer import MLP, Attention, Linear, fuse_projections

QUANTIZE = ("int8",)  # the choices of --quantize / from_pretrained(quantize=...); None: the float weights


def kernel_available() -> bool:
    """Whether this torch has the CPU kernel `torch.ops.aten._weight_int8pack_mm`."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def kernel_fits(in_features: int) -> bool:
    """Whether the kernel takes weights of this input width: its vector loops read 16 columns at a time (a
    narrower tail reads past the row)."""
    return in_features % 16 == 0 and kernel_available()


class Int8Weight(nn.Module):
    """A (N, K) product weight as int8 values (N, K) and bfloat16 scales (N,), one per output row: w ≈ q * s[:, None].
    forward(x) is x @ w.T with x (..., K) in any float dtype, computed in bfloat16 activations and returned in x's
    dtype (see the module's docstring). The buffers are not persistent: a model's state dict stays its float one."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        if values.dtype != torch.int8 or values.dim() != 2 or scales.shape != values.shape[:1]:
            raise ValueError(f"Int8Weight needs int8 values (N, K) and N scales, got {tuple(values.shape)} "
                             f"{values.dtype} and {tuple(scales.shape)}")
        self.register_buffer("values", values, persistent=False)
        self.register_buffer("scales", scales.to(torch.bfloat16), persistent=False)
        self.packed = kernel_fits(values.shape[1])  # the kernel, else the float32 product of `dequantized`

    @classmethod
    @torch.no_grad()
    def of(cls, weight: torch.Tensor) -> "Int8Weight":
        """The int8 form of a float weight (N, K): per row s = max|w| / 127 (rounded to bfloat16, the dtype the
        kernel reads) and q = round(w / s) clamped to [-127, 127]; a row of zeros gets s = 0 and q = 0."""
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).to(torch.bfloat16)
        s = scales.float()[:, None]
        q = torch.where(s > 0, w / torch.where(s > 0, s, 1.0), 0.0).round_().clamp_(-127, 127)
        return cls(q.to(torch.int8), scales)

    def rows(self, start: int, end: int) -> "Int8Weight":
        """Rows [start, end) as views (the parts of a fused matrix)."""
        return Int8Weight(self.values[start:end], self.scales[start:end])

    def select(self, ids: torch.Tensor) -> "Int8Weight":
        """The rows `ids`, copied (the draft vocabulary's rows of the LM head)."""
        ids = ids.to(self.values.device)
        return Int8Weight(self.values.index_select(0, ids), self.scales.index_select(0, ids))

    def dequantized(self) -> torch.Tensor:
        """q * s in float32 (N, K): the weight these products multiply by."""
        return self.values.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        # a new bfloat16 tensor, contiguous and allocator-aligned: the kernel loads activation rows with aligned
        # vector loads (an offset view, e.g. the last positions of a bfloat16 model's hidden state, crashes it)
        x2 = x.reshape(-1, k).to(torch.bfloat16, copy=True)
        if self.packed:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.values, self.scales)
        else:
            y = F.linear(x2.float(), self.dequantized()).to(torch.bfloat16)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.values.shape[0])

    def extra_repr(self) -> str:
        n, k = self.values.shape
        return f"{k} -> {n}, {'_weight_int8pack_mm' if self.packed else 'dequantised float32 product'}"


def check_quantize(quantize: str | None, device: torch.device | str) -> None:
    """A ConfigError, in one line, unless `quantize` is None or one of QUANTIZE and the device is the CPU."""
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise ConfigError(f"unknown quantize {quantize!r}; choose {', '.join(QUANTIZE)} (or none for the float "
                          f"weights)")
    if torch.device(device).type != "cpu":
        raise ConfigError(f"--quantize {quantize} (weight-only int8 products) runs on the CPU only, and this model "
                          f"is on {device}: pass --device cpu, or leave --quantize out")


def quantize_int8_(model: nn.Module) -> nn.Module:
    """Give every product weight of `model` (a Transformer, a RecyclableModule, a RecycleModel) its int8 form, in
    place: the fused QKV and gate-up matrices (fused here: `fuse_projections`), their parts as row views of them,
    and every other `Linear`, the LM head included (tied to the embedding, which keeps its float weights for
    lookups). A RecycleModel's draft-vocabulary head takes the LM head's rows (`refresh_draft_head`). Run it again
    after the weights change. Returns the model."""
    p = next(model.parameters(), None)
    check_quantize("int8", p.device if p is not None else "cpu")
    fuse_projections(model)  # one int8 product instead of three and two, the same values (scales are per row)
    parts = set()
    for m in list(model.modules()):
        if isinstance(m, (Attention, MLP)):
            name, linears = ("wqkv", (m.wq, m.wk, m.wv)) if isinstance(m, Attention) else ("w13", (m.w1, m.w3))
            fused = Int8Weight.of(getattr(m, name))
            setattr(m, f"{name}_int8", fused)
            start = 0
            for lin in linears:
                lin.int8 = fused.rows(start, start + lin.out_features)
                start += lin.out_features
                parts.add(lin)
    for m in list(model.modules()):
        if isinstance(m, Linear) and m not in parts:
            m.int8 = Int8Weight.of(m.weight)
    return model


def quantize_models(quantize: str | None, *models: nn.Module | None) -> None:
    """Apply the choice `quantize` (None, or one of QUANTIZE) to each model given (None entries are skipped)."""
    if quantize is None:
        return
    check_quantize(quantize, "cpu")  # the name; quantize_int8_ checks each model's device
    for model in models:
        if model is not None:
            quantize_int8_(model)


def quantized(model: nn.Module) -> str | None:
    """"int8" where `model`'s products take int8 forms (`quantize_int8_`), else None."""
    return "int8" if any(isinstance(m, Int8Weight) for m in model.modules()) else None

"""SwiGLU gated MLP (Llama): down(silu(gate(x)) * up(x)) with the fused activation."""

from __future__ import annotations

from torch import Tensor, nn

from fastpt.nn.linear import Linear
from fastpt.ops import reference
from fastpt.ops.swiglu import swiglu


class SwiGLU(nn.Module):
    """The Llama MLP. Parameter names match HF's LlamaMLP (gate_proj, up_proj, down_proj).

    Args:
        hidden_size: model width d.
        intermediate_size: inner width (Llama: about 8/3 d, rounded).
        bias: add biases to the three projections.
        use_fused: False runs the pure-PyTorch activation instead (for A/B checks).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False,
                 device=None, dtype=None, use_fused: bool = True):
        super().__init__()
        if hidden_size < 1 or intermediate_size < 1:
            raise ValueError(f"sizes must be positive, got {hidden_size} and {intermediate_size}")
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, **kw)
        self.use_fused = use_fused

    def forward(self, x: Tensor) -> Tensor:  # (..., d) -> (..., d)
        width = getattr(self.gate_proj, "in_features", None)  # (None: wrapped by a PEFT layer)
        if width is not None and (x.dim() == 0 or x.shape[-1] != width):  # else a matmul error naming no module
            raise ValueError(f"SwiGLU: x must be (..., {width}), got shape {tuple(x.shape)}")
        act = swiglu if self.use_fused else reference.swiglu
        return self.down_proj(act(self.gate_proj(x), self.up_proj(x)))

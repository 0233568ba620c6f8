"""Torch reference of psnrl/kernels/noisy_linear.py: materializes W + sigma_s E_s per stream, in fp32.

Same semantics as the kernel, autograd included (noisy rows are constants), so
it is also the CPU path of ``noisy_linear`` outside the Triton interpreter.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from psnrl.kernels import noise_reference as R

if TYPE_CHECKING:
    from psnrl.kernels.noise_rows import StreamRows


def noisy_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                           rows: StreamRows | None = None, param_key: int = 0, row_offset: int = 0,
                           col_offset: int = 0, in_features: int | None = None) -> torch.Tensor:
    """fp32 result of x (W + sigma_s E_s)^T + b, row by row stream; returned in fp32."""
    k = weight.shape[1]
    x2d = x.reshape(-1, k).float()
    w = weight.float()
    y = torch.empty(x2d.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    ids = rows.ids.long() if rows is not None else torch.zeros(x2d.shape[0], dtype=torch.long,
                                                                device=x.device)
    b = bias.float() if bias is not None else None
    streams = rows.streams if rows is not None else []
    for s in ids.unique().tolist():
        sel = ids == s
        if s > 0 and streams[s - 1].sigma > 0:
            stream = streams[s - 1]
            with torch.no_grad():  # noisy rows carry no gradient
                w_s = w + R.noise((weight.shape[0], weight.shape[1]), stream.seed, param_key, stream.sigma,
                                  row_offset=row_offset, col_offset=col_offset,
                                  in_features=in_features, device=x.device)
                y[sel] = torch.nn.functional.linear(x2d[sel], w_s, b)
        else:
            y[sel] = torch.nn.functional.linear(x2d[sel], w, b)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def noisy_gate_up_reference(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, *,
                            rows: StreamRows | None = None, gate_key: int = 0, up_key: int = 0,
                            row_offset: int = 0, col_offset: int = 0,
                            in_features: int | None = None,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SiLU(x Wg~^T) * (x Wu~^T): the two noisy linears (fp32), rounded to ``dtype`` as the
    unfused model rounds them, then the gated activation in ``dtype``."""
    def linear(weight: torch.Tensor, key: int) -> torch.Tensor:
        return noisy_linear_reference(x, weight, rows=rows, param_key=key, row_offset=row_offset,
                                      col_offset=col_offset, in_features=in_features).to(dtype)

    gate, up = linear(gate_weight, gate_key), linear(up_weight, up_key)
    return torch.nn.functional.silu(gate) * up

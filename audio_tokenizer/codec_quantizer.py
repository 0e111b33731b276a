"""Residual LFQ quantizer with weight-normalised 1x1 projections, always evaluated in float32.

The 1x1 convolutions are evaluated as matmuls with the effective weight ``g * v / ||v||`` computed once (with
``torch._weight_norm``, the kernel behind PyTorch's parametrization) and cached until the parameters change. Why
matmuls: cuDNN (TF32) and Ascend (HF32) convolutions default to reduced precision, matmuls do not.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .torch_compat import autocast_available


def autocast_disabled(device_type: str):
    """A context that turns autocast off for ``device_type`` (a no-op where autocast does not exist)."""
    if autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _version(tensor: torch.Tensor) -> int | None:
    """In-place modification counter (None for inference-mode tensors, which have none)."""
    return None if tensor.is_inference() else tensor._version


class _WeightNormParameters(nn.Module):
    """Holds g (``original0``, ``[out,1,1]``) and v (``original1``, ``[out,in,1]``) under the parametrization names."""

    def __init__(self, out_channels: int, in_channels: int) -> None:
        super().__init__()
        self.original0 = nn.Parameter(torch.ones(out_channels, 1, 1))
        self.original1 = nn.Parameter(torch.empty(out_channels, in_channels, 1))


class WeightNormConv1x1(nn.Module):
    """Weight-normalised ``Conv1d(in, out, 1)`` with bias, applied to channel-last rows ``(..., in)``.

    The state_dict keys are those of ``torch.nn.utils.parametrizations.weight_norm``:
    ``parametrizations.weight.original0`` / ``original1`` and ``bias``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.parametrizations = nn.Module()
        self.parametrizations.weight = _WeightNormParameters(out_channels, in_channels)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self._cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def _cache_key(self) -> tuple:
        g, v = self.parametrizations.weight.original0, self.parametrizations.weight.original1
        return tuple((t.device, t.dtype, t.data_ptr(), _version(t)) for t in (g, v, self.bias))

    def refresh(self) -> None:
        """Recompute the effective weight (after the parameters were replaced or edited in place)."""
        g, v = self.parametrizations.weight.original0, self.parametrizations.weight.original1
        device = v.device
        # Normal (not inference-mode) tensors, so the cache also serves calls made outside inference_mode.
        with torch.inference_mode(False), torch.no_grad():
            # Computed on the CPU in fp32 so every device uses bit-identical weights (upstream's reference numbers).
            if device.type != "meta":
                g, v = g.detach().cpu(), v.detach().cpu()
            weight = torch._weight_norm(v.detach().float(), g.detach().float(), 0).squeeze(-1)  # (out, in)
            self._cache = (self._cache_key(), weight.to(device), self.bias.detach().float())

    def effective_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight (out,in), bias (out,))`` in float32 on the parameters' device."""
        if self._cache is None or self._cache[0] != self._cache_key():
            self.refresh()
        return self._cache[1], self._cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.effective_parameters()
        return F.linear(x.float(), weight, bias)


class _LFQStage(nn.Module):
    def __init__(self, rvq_dim: int, codebook_dim: int, codebook_size: int) -> None:
        super().__init__()
        self.in_proj = WeightNormConv1x1(rvq_dim, codebook_dim)
        self.out_proj = WeightNormConv1x1(codebook_dim, rvq_dim)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)


class ResidualLFQ(nn.Module):
    """Residual quantizer: cosine-nearest codes per stage, residual updated with the raw codebook vectors."""

    def __init__(self, input_dim: int, rvq_dim: int, output_dim: int, num_quantizers: int, codebook_size: int,
                 codebook_dim: int, **_unused) -> None:
        super().__init__()
        self.num_quantizers = num_quantizers
        self.codebook_size = codebook_size
        self.input_proj = WeightNormConv1x1(input_dim, rvq_dim)
        self.quantizers = nn.ModuleList(
            _LFQStage(rvq_dim, codebook_dim, codebook_size) for _ in range(num_quantizers))
        self.output_proj = WeightNormConv1x1(rvq_dim, output_dim)

    def weight_norm_modules(self) -> list[WeightNormConv1x1]:
        return [m for m in self.modules() if isinstance(m, WeightNormConv1x1)]

    def encode(self, hidden: torch.Tensor, lengths: torch.Tensor, num_quantizers: int) -> torch.Tensor:
        """Quantize encoder output ``hidden (B,C,N)`` with valid frame ``lengths (B,)``; returns codes ``(n,B,N)``."""
        with autocast_disabled(hidden.device.type):
            batch, _, frames = hidden.shape
            valid = (torch.arange(frames, device=hidden.device) < lengths[:, None]).float()[..., None]  # (B, N, 1)
            residual = self.input_proj(hidden.float().transpose(1, 2))  # (B, N, rvq)
            codes = []
            for stage in self.quantizers[:num_quantizers]:
                encoded = stage.in_proj(residual * valid)  # (B, N, cb_dim)
                rows = F.normalize(encoded.reshape(batch * frames, -1), dim=-1)  # (B*N, cb_dim)
                codebook = stage.codebook.weight.float()
                unit_codebook = F.normalize(codebook, dim=-1)
                distance = ((rows.pow(2).sum(1, keepdim=True) - 2 * rows @ unit_codebook.t())
                            + unit_codebook.pow(2).sum(1, keepdim=True).t())
                index = (-distance).argmax(dim=1)  # first index on ties
                quantized = codebook[index].view(batch, frames, -1)
                quantized = encoded + (quantized - encoded)  # straight-through form, as upstream evaluates it
                residual = residual - stage.out_proj(quantized) * valid
                codes.append(index.view(batch, frames))
            return torch.stack(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(nq,B,N)`` -> ``(B,output_dim,N)`` float32 (no masking; the first nq stages are summed)."""
        with autocast_disabled(codes.device.type):
            embedding = None
            for stage, stage_codes in zip(self.quantizers, codes):
                contribution = stage.out_proj(stage.codebook.weight.float()[stage_codes])  # (B, N, rvq)
                embedding = contribution if embedding is None else embedding + contribution
            return self.output_proj(embedding).transpose(1, 2)

"""SA-MIL (Li et al., MedIA 2023): VGG-MIL with criss-cross self-attention in every block.

Each of the three VGG16 blocks is followed (after its convolutions, before its max-pool) by CCNet's
recurrent criss-cross attention: query/key 1x1 convs to C/8 channels, value 1x1 conv C->C, a
learnable `gamma` initialised to 0 (so training starts from plain VGG-MIL) and a residual, applied
twice with shared weights so that every pixel reaches every other pixel. Each pixel attends to the
H+W-1 pixels of its row and column: softmax over the H+W energies of the two branches with the
duplicate centre masked out of the vertical one, as in CCNet.

Memory: the energies are B x H x W x (H+W) (never B x HW x HW), and they are only ever held for a
chunk of rows at a time: training recomputes each chunk in the backward pass (activation
checkpointing), so at 256 px a chunk stays under `CHUNK_ELEMENTS` whatever the batch, and what is
kept per image is a few C x H x W maps per attention pass. Measured at 256 px, batch 16, fp32 CPU
training: 10.9 GB peak (~0.67 GB per image; VGG-MIL: 3.1 GB, ~0.18 GB per image). Unchunked, block 1's
energies alone would be 134 MB per image per tensor; a B x HW x HW energy would be 17 GB per image.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ikdmil.models.registry import register_backbone
from ikdmil.models.vgg import VGG16_BLOCKS, vgg_mil

#: Upper bound on the energy elements (B x rows x W x (H+W)) computed at once: 32 MiB in float32.
CHUNK_ELEMENTS = 2**23
#: Energies further than this below a pixel's largest are raised to it (their weight is < e^-30).
ENERGY_RANGE = 30.0


def _criss_cross_rows(q, k, v, k_col, v_col, r0: int, r1: int) -> torch.Tensor:
    """Criss-cross attention output for image rows r0:r1 as (B, rows, W, C).

    q, k, v are channels-last (B, H, W, C); k_col, v_col the same maps laid out by column
    (B, W, H, C), so that both branches are plain batched matmuls over contiguous memory.
    """
    h = q.shape[1]
    q_rows = q[:, r0:r1]  # (B, n, W, C')
    e_row = q_rows @ k[:, r0:r1].transpose(-1, -2)  # (B, n, W, W): pixel (r, w) against row r
    e_col = (q_rows.transpose(1, 2) @ k_col.transpose(-1, -2)).transpose(1, 2)  # (B, n, W, H): against column w
    energy = torch.cat([e_col, e_row], dim=-1)
    # floor at max - ENERGY_RANGE: weights below e^-30 vanish in float32 sums anyway, and the denormal
    # floats they would otherwise become made the CPU forward + backward of one block ~9x slower
    energy = torch.maximum(energy, energy.detach().amax(dim=-1, keepdim=True) - ENERGY_RANGE)
    centre = torch.arange(r0, r1, device=q.device)[:, None] == torch.arange(h, device=q.device)[None, :]
    centre = torch.cat([centre, centre.new_zeros(r1 - r0, energy.shape[-1] - h)], dim=1)
    energy = energy.masked_fill(centre[None, :, None, :], float("-inf"))  # the centre counts once (row branch)
    att = torch.softmax(energy, dim=-1).to(v.dtype)
    a_col, a_row = att.split([h, att.shape[-1] - h], dim=-1)
    return a_row @ v[:, r0:r1] + (a_col.transpose(1, 2) @ v_col).transpose(1, 2)


def criss_cross(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows_per_chunk: int | None = None) -> torch.Tensor:
    """CCNet criss-cross attention of q/k (B,C',H,W) over v (B,C,H,W) -> (B,C,H,W), in row chunks.

    Chunks hold at most `CHUNK_ELEMENTS` energies (or `rows_per_chunk` rows). When gradients are
    needed each chunk is checkpointed: the backward pass recomputes its energies (about a third more
    attention work) instead of keeping them, so training memory does not grow with H x W x (H+W).
    """
    b, _, h, w = q.shape
    rows = rows_per_chunk or max(1, CHUNK_ELEMENTS // (b * w * (h + w)))
    q, k, v = (t.permute(0, 2, 3, 1) for t in (q, k, v))  # free for channels_last tensors
    q, k = q.contiguous(), k.contiguous()
    k_col, v_col = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    v = v.contiguous()
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    chunks = []
    for r0 in range(0, h, rows):
        args = (q, k, v, k_col, v_col, r0, min(h, r0 + rows))
        chunks.append(checkpoint(_criss_cross_rows, *args, use_reentrant=False) if grad else _criss_cross_rows(*args))
    return torch.cat(chunks, dim=1).permute(0, 3, 1, 2)


class CrissCrossAttention(nn.Module):
    """Recurrent criss-cross attention (CCNet's RCCA core): `recurrence` passes with shared weights."""

    def __init__(self, channels: int, recurrence: int = 2):
        super().__init__()
        inner = max(1, channels // 8)
        self.query_conv = nn.Conv2d(channels, inner, 1)
        self.key_conv = nn.Conv2d(channels, inner, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.recurrence = recurrence

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            out = criss_cross(self.query_conv(x), self.key_conv(x), self.value_conv(x))
            x = self.gamma.to(out.dtype) * out + x
        return x


@register_backbone("sa_mil")
def sa_mil(pretrained: str | None = "imagenet"):
    """VGG-MIL + criss-cross attention per block; VGG16 conv weights as for `vgg16`."""
    return vgg_mil(pretrained, post=[CrissCrossAttention(convs[-1]) for convs in VGG16_BLOCKS])

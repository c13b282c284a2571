"""Swin-MIL (Qian et al., MICCAI 2022): Swin-T stages 1-3, a LayerNorm and a side output per stage.

Swin-T: patch 4, embed 96, depths 2/2/6/2, heads 3/6/12/24, window 7, MLP ratio 4, stochastic depth
0.2 (linear over all 12 blocks, so stages 1-3 get the same rates as in the full model). Only stages
1-3 (strides 4/8/16, 96/192/384 channels) are built; stage 4 and the classifier are not used.
Any input size works, as in the official dense-prediction Swin: the image is padded to a multiple of
the patch size, every block pads its map to a multiple of the window, patch merging pads odd sizes,
and shifted-window blocks use the attention mask that keeps the cyclically shifted regions apart.

Module names follow timm >= 0.9 (`patch_embed.proj`, `layers.{i}.blocks.{j}.attn.qkv`,
`layers.{i}.downsample.reduction` at the *start* of stages 1 and 2), so a timm state dict loads by
name; official microsoft/Swin-Transformer checkpoints put the merging at the *end* of the previous
stage and are renamed on load. `relative_position_index` and `attn_mask` are recomputed, never loaded.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ikdmil.models.registry import register_backbone

EMBED_DIM = 96
DEPTHS = (2, 2, 6, 2)  # Swin-T; the last stage is not built
HEADS = (3, 6, 12, 24)
WINDOW = 7
PATCH = 4
DROP_PATH = 0.2
BUILT_STAGES = 3
MASK_VALUE = -100.0  # official Swin's value for "other region" in the shifted-window mask


def relative_position_index(window: int) -> torch.Tensor:
    """(window^2, window^2) index into the ((2*window-1)^2, heads) relative position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of `window` -> (B * nW, window^2, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, window: int, shift: int, device) -> torch.Tensor:
    """(nW, window^2, window^2) additive mask: 0 within a region, MASK_VALUE across regions."""
    regions = torch.zeros(1, h, w, 1, device=device)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (hs, ws) in enumerate((hs, ws) for hs in cuts for ws in cuts):
        regions[:, hs, ws] = i
    ids = window_partition(regions, window).squeeze(-1)
    return (ids[:, None, :] != ids[:, :, None]).float() * MASK_VALUE


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).to(attn.dtype)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(-1, nw, self.heads, n, n) + mask[None, :, None].to(attn.dtype)).view(bw, self.heads, n, n)
        out = attn.softmax(dim=-1).to(v.dtype) @ v
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """(Shifted-)window attention + MLP on a (B, H, W, C) map, pre-norm, residual."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, drop_path: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        _, h, w, _ = x.shape
        ws, s = self.window, self.shift
        y = F.pad(self.norm1(x), (0, 0, 0, (-w) % ws, 0, (-h) % ws))
        hp, wp = y.shape[1:3]
        if s:
            y = torch.roll(y, (-s, -s), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, ws), mask if s else None), ws, hp, wp)
        if s:
            y = torch.roll(y, (s, s), dims=(1, 2))
        x = x + self.drop_path(y[:, :h, :w])
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (official order x00, x10, x01, x11), LayerNorm, linear 4C -> 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, drop_paths: list[float], downsample: bool):
        super().__init__()
        self.downsample = PatchMerging(dim // 2) if downsample else None
        self.window = window
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, 0 if j % 2 == 0 else window // 2, drop_paths[j]) for j in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        ws = self.window
        hp, wp = -(-x.shape[1] // ws) * ws, -(-x.shape[2] // ws) * ws
        mask = shifted_window_mask(hp, wp, ws, ws // 2, x.device) if len(self.blocks) > 1 else None
        for block in self.blocks:
            x = block(x, mask)
        return x


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        x = F.pad(x, (0, (-x.shape[3]) % p, 0, (-x.shape[2]) % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinStages(nn.Module):
    """Swin-T patch embedding + stages 1-3; forward returns each stage's LayerNorm-ed (B, C, H, W) map."""

    new_prefixes = ("out_norms.",)  # side-output norms: not part of an ImageNet Swin-T

    def __init__(self, dim: int = EMBED_DIM, depths=DEPTHS, heads=HEADS, window: int = WINDOW,
                 patch: int = PATCH, drop_path: float = DROP_PATH, stages: int = BUILT_STAGES):
        super().__init__()
        rates = torch.linspace(0, drop_path, sum(depths)).tolist()
        self.patch_embed = PatchEmbed(dim, patch)
        self.layers = nn.ModuleList()
        self.out_channels = []
        for i in range(stages):
            d = dim * 2**i
            first = sum(depths[:i])
            self.layers.append(SwinStage(d, depths[i], heads[i], window, rates[first:first + depths[i]], i > 0))
            self.out_channels.append(d)
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in self.out_channels)
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        feats = []
        for layer, norm in zip(self.layers, self.out_norms):
            x = layer(x)
            feats.append(norm(x).permute(0, 3, 1, 2))
        return feats


def _init(m: nn.Module) -> None:
    """Swin's initialisation: truncated-normal linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


_RECOMPUTED = ("relative_position_index", "attn_mask")
_UNUSED = (f"layers.{BUILT_STAGES}.", "norm.", "head.")  # stage 4, final norm, classifier


def swin_key_renamer(state_keys) -> tuple:
    """Pick the key layout of a Swin state dict: returns (rename function, layout name).

    Official checkpoints have `layers.0.downsample` (the merging at the end of stage i); timm >= 0.9
    has it at the start of stage i + 1 and never at stage 0.
    """
    official = any(k.startswith("layers.0.downsample.") for k in state_keys)

    def rename(key: str) -> str | None:
        if key.endswith(_RECOMPUTED):
            return None
        if official:
            m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
            if m:
                key = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        return None if key.startswith(_UNUSED) else key

    return rename, "official Swin keys" if official else "timm keys"


@register_backbone("swin_t")
def swin_t(pretrained: str | None = "imagenet"):
    """Swin-T stages 1-3 (strides 4/8/16); weights from an official or timm Swin-T state dict."""
    from ikdmil.models.weights import load_renamed_state, read_state_dict, weights_file

    net = SwinStages()
    path, message = weights_file(pretrained, "swin_t")
    if path is not None:
        state = read_state_dict(path, "swin_t")
        rename, layout = swin_key_renamer(state)
        message = load_renamed_state(net, state, path, "swin_t", rename, SwinStages.new_prefixes, layout)
    return net, message

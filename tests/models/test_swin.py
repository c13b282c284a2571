"""Swin's window partition and shifted-window attention against a per-token reference."""

import torch


def test_swin_window_partition_roundtrip_and_relative_index():
    from ikdmil.models.swin import (
        relative_position_index,
        window_partition,
        window_reverse,
    )

    x = torch.randn(2, 14, 21, 5)
    assert torch.equal(window_reverse(window_partition(x, 7), 7, 14, 21), x)
    idx = relative_position_index(7)
    assert idx.shape == (49, 49) and int(idx.min()) == 0 and int(idx.max()) == 13 * 13 - 1
    assert int(idx[0, 48]) == 0 and int(idx[48, 0]) == 13 * 13 - 1  # offsets (-6,-6) and (+6,+6)


def test_shifted_window_block_matches_a_per_token_reference():
    """Each token attends to the tokens of its window in the cyclically shifted map that were also
    neighbours before the shift (same region), with the bias of their relative position."""
    from ikdmil.models.swin import SwinBlock, shifted_window_mask

    torch.manual_seed(0)
    ws, shift, size, dim, heads = 7, 3, 14, 8, 2
    blk = SwinBlock(dim, heads, ws, shift, drop_path=0.0).eval()
    x = torch.randn(1, size, size, dim)
    with torch.no_grad():
        got = blk(x, shifted_window_mask(size, size, ws, shift, x.device))
        q, k, v = blk.attn.qkv(blk.norm1(x))[0].view(size, size, 3, heads, dim // heads).unbind(2)
        table = blk.attn.relative_position_bias_table

        def region(a):  # the three bands of the shifted map along one axis
            return 0 if a < size - ws else (1 if a < size - shift else 2)

        att = torch.zeros(size, size, dim)
        for i in range(size):
            for j in range(size):
                a, b = (i - shift) % size, (j - shift) % size  # position in the shifted map
                partners = [(i2, j2) for i2 in range(size) for j2 in range(size)
                            if ((i2 - shift) % size) // ws == a // ws and ((j2 - shift) % size) // ws == b // ws
                            and region((i2 - shift) % size) == region(a) and region((j2 - shift) % size) == region(b)]
                for h in range(heads):
                    logits = []
                    for i2, j2 in partners:
                        da = (a % ws) - ((i2 - shift) % size % ws) + ws - 1
                        db = (b % ws) - ((j2 - shift) % size % ws) + ws - 1
                        dot = q[i, j, h] @ k[i2, j2, h] * (dim // heads) ** -0.5
                        logits.append(dot + table[da * (2 * ws - 1) + db, h])
                    w = torch.softmax(torch.stack(logits), 0)
                    att[i, j, h * (dim // heads):(h + 1) * (dim // heads)] = sum(
                        wi * v[i2, j2, h] for wi, (i2, j2) in zip(w, partners))
        z = x + blk.attn.proj(att)[None]
        expect = z + blk.mlp(blk.norm2(z))
    assert torch.allclose(got, expect, atol=1e-5)

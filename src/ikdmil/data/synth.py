"""Procedural H&E-like patches with exact tumour masks, for the demo, the tests and quick experiments.

Nothing here is real histology; it is a stand-in that has the properties a weakly-supervised model
must cope with:

- colour is made by Beer–Lambert mixing of haematoxylin and eosin: per-pixel stain concentrations
  ``c_H``, ``c_E`` (plus a little residual) give ``RGB = I0 * exp(-(c_H*OD_H + c_E*OD_E + ...))``;
- every image gets its own stain vectors, stain strengths, section thickness and illumination, and
  this jitter is larger than the mean colour difference between tumour and tumour-free patches, so
  colour alone does not tell the classes apart;
- tumour is a morphological signal: inside irregular regions, nuclei are larger, darker, crowded,
  irregular and disordered, glands are gone and a few cribriform holes appear; outside them tissue
  has stroma with collagen streaks and clefts, gland rings of small regular nuclei around pale
  lumens, scattered lymphocytes and fibroblasts, and sometimes a dense lymphoid aggregate (a dark
  but benign hard negative);
- the mask is exactly the set of pixels drawn as tumour tissue.

Drawing is vectorised (smooth noise by bicubic upsampling, nuclei rasterised as soft ellipses on small
boxes and accumulated with ``np.bincount``), about 10-20 ms for a 256x256 patch.
Sizes are in pixels at roughly 0.5 µm/px: a bigger patch shows more tissue, not bigger cells.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from ikdmil.data.io import write_png, write_text
from ikdmil.data.manifest import MANIFEST_NAME, SPLITS, Sample, write_manifest
from ikdmil.errors import IkdmilError

GENERATOR_VERSION = 1
MIN_SIZE = 32
MIN_IMAGES = 6

# Typical optical-density directions (R, G, B) of the two stains, normalised below.
OD_HAEMATOXYLIN = np.array([0.65, 0.70, 0.29])
OD_EOSIN = np.array([0.07, 0.99, 0.11])

# Tumour fractions handed out to positives in turn (per split), from small foci to whole patches.
POSITIVE_FRACTIONS = (0.04, 0.55, 0.08, 1.0, 0.15, 0.8, 0.3, 1.0, 0.06, 0.4)


# ----------------------------------------------------------------------------------------------
# texture primitives


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _normalise(a: np.ndarray) -> np.ndarray:
    a = a - a.mean()
    sd = float(a.std())
    return a / sd if sd > 1e-8 else a


def _noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Smooth zero-mean unit-std noise (size, size) whose blobs are about `cell` px across."""
    cell = max(float(cell), 1.0)
    n = int(math.ceil(size / cell)) + 3
    grid = rng.standard_normal((n, n)).astype(np.float32)
    big = int(round(n * cell))
    up = np.asarray(Image.fromarray(grid).resize((big, big), Image.BICUBIC))
    o = int(round(cell))  # drop the border cell, where bicubic sees the edge
    return _normalise(up[o : o + size, o : o + size])


def _streaks(rng: np.random.Generator, size: int, angle: float, layers: list[tuple[float, float, float]]) -> np.ndarray:
    """Unit-std noise stretched into fibres at `angle` degrees; layers = (weight, px across, px along)."""
    big = int(math.ceil(size * 1.45)) + 2
    acc = np.zeros((big, big), np.float32)
    for weight, across, along in layers:
        rows = int(math.ceil(big / across)) + 2
        cols = int(math.ceil(big / along)) + 2
        grid = rng.standard_normal((rows, cols)).astype(np.float32)
        acc += weight * np.asarray(Image.fromarray(grid).resize((big, big), Image.BICUBIC))
    img = Image.fromarray(acc).rotate(angle, resample=Image.BILINEAR)
    o = (big - size) // 2
    return _normalise(np.asarray(img)[o : o + size, o : o + size])


def _stamp(
    shape: tuple[int, int],
    cy: np.ndarray,
    cx: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    dens: np.ndarray,
    irregular: np.ndarray | None = None,
    rim: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise N soft-edged ellipses (nuclei); return (stain-density sum, coverage sum) maps.

    a, b: semi-axes (px) along / across `theta` (radians); dens: haematoxylin concentration at the
    nucleus; irregular: (N, 4) = 2nd/3rd harmonic amplitudes and phases of the outline; rim > 0 makes
    the centre paler than the membrane (vesicular chromatin). Each ellipse is evaluated on a small
    box around its centre, all boxes at once, and the boxes are summed into the canvas by bincount.
    """
    h, w = shape
    if len(cy) == 0:
        z = np.zeros(shape, np.float32)
        return z, z.copy()
    grow = 1.0 + (float(np.abs(irregular[:, :2]).sum(1).max()) if irregular is not None else 0.0)
    r = int(math.ceil(float(np.max(a)) * grow)) + 2
    off_i = np.arange(-r, r + 1)
    off = off_i.astype(np.float32)
    iy = np.floor(cy).astype(np.int64)
    ix = np.floor(cx).astype(np.int64)
    fy = (cy - iy).astype(np.float32)[:, None, None]
    fx = (cx - ix).astype(np.float32)[:, None, None]
    dy = off[None, :, None] - fy
    dx = off[None, None, :] - fx
    ct = np.cos(theta).astype(np.float32)[:, None, None]
    st = np.sin(theta).astype(np.float32)[:, None, None]
    ua = (dx * ct + dy * st) / a.astype(np.float32)[:, None, None]
    vb = (dy * ct - dx * st) / b.astype(np.float32)[:, None, None]
    rho = np.sqrt(ua * ua + vb * vb)
    if irregular is not None:
        phi = np.arctan2(vb, ua)
        e2, e3, p2, p3 = (irregular[:, k].astype(np.float32)[:, None, None] for k in range(4))
        rho = rho / (1.0 + e2 * np.cos(2.0 * phi + p2) + e3 * np.cos(3.0 * phi + p3))
    edge = (0.5 * (a + b)).astype(np.float32)[:, None, None]
    alpha = np.clip(0.5 + (1.0 - rho) * edge, 0.0, 1.0)
    val = alpha * dens.astype(np.float32)[:, None, None]
    if rim > 0:
        val *= 1.0 - rim * np.clip(1.0 - rho * 1.25, 0.0, 1.0)
    hp, wp = h + 2 * r, w + 2 * r
    flat = (iy[:, None, None] + r + off_i[None, :, None]) * wp + (ix[:, None, None] + r + off_i[None, None, :])
    flat = flat.ravel()
    ok = (flat >= 0) & (flat < hp * wp)  # centres are inside the image, so this is only a guard
    flat = flat[ok]
    dsum = np.bincount(flat, weights=val.ravel()[ok], minlength=hp * wp).reshape(hp, wp)
    csum = np.bincount(flat, weights=alpha.ravel()[ok], minlength=hp * wp).reshape(hp, wp)
    return (
        dsum[r : r + h, r : r + w].astype(np.float32),
        csum[r : r + h, r : r + w].astype(np.float32),
    )


class _Nuclei:
    """Collects nucleus parameters from several sources, then stamps them in one go."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, cy, cx, a, b, theta, dens) -> None:
        arrs = [np.atleast_1d(np.asarray(x, np.float64)) for x in (cy, cx, a, b, theta, dens)]
        n = max(len(x) for x in arrs)
        self.parts.append(tuple(np.broadcast_to(x, (n,)) for x in arrs))

    def arrays(self) -> list[np.ndarray]:
        if not self.parts:
            return [np.zeros(0) for _ in range(6)]
        return [np.concatenate([p[k] for p in self.parts]) for k in range(6)]


def _inside(size: int, cy: np.ndarray, cx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.clip(cy, 0, size - 1e-3).astype(np.int64), np.clip(cx, 0, size - 1e-3).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# tissue components


def _tumour_mask(rng: np.random.Generator, size: int, fraction: float) -> np.ndarray:
    """An irregular region covering ~`fraction` of the patch (a compact focus when small)."""
    if fraction <= 0:
        return np.zeros((size, size), bool)
    if fraction >= 0.999:
        return np.ones((size, size), bool)
    cell = max(24.0, size / rng.uniform(2.0, 3.5))
    field = _noise(rng, size, cell) + 0.35 * _noise(rng, size, cell / 3.5) + 0.12 * _noise(rng, size, 7)
    # Pull the region towards a random centre; the pull is strong for small foci (one blob) and
    # weak for large fractions (ragged, possibly multifocal fronts).
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    yy, xx = np.ogrid[:size, :size]
    d2 = ((yy - cy) ** 2 + (xx - cx) ** 2).astype(np.float32) / float(size * size)
    field -= (8.0 * (1.0 - fraction) ** 2 + 0.5) * d2 * 4.0
    k = int(round((1.0 - fraction) * field.size))
    k = min(max(k, 0), field.size - 1)
    thr = np.partition(field.ravel(), k)[k]
    mask = field > thr
    # drop crumbs and pinholes smaller than a couple of cells
    min_area = 40
    lab, n = ndimage.label(mask)
    if n > 1:
        areas = np.bincount(lab.ravel())
        areas[0] = 0
        keep = areas >= min_area
        keep[int(np.argmax(areas))] = True
        keep[0] = False
        mask = keep[lab]
    lab, n = ndimage.label(~mask)
    if n > 1:
        areas = np.bincount(lab.ravel())
        fill = areas < min_area
        fill[0] = False
        mask |= fill[lab]
    return mask


def _glands(
    rng: np.random.Generator,
    size: int,
    mask: np.ndarray,
    H: np.ndarray,
    E: np.ndarray,
    white: np.ndarray,
    nuclei: _Nuclei,
    cover: float,
) -> None:
    """Draw normal glands (lumen, cytoplasm ring, evenly spaced basal nuclei) outside the mask."""
    placed: list[tuple[float, float, float]] = []
    target = cover * float((~mask).sum())
    area = 0.0
    for _ in range(60):
        if area >= target:
            break
        A = rng.uniform(11, 26)
        B = A * rng.uniform(0.55, 0.95)
        ang = rng.uniform(0, math.pi)
        gy, gx = rng.uniform(-0.3 * A, size + 0.3 * A, 2)
        if any((gy - py) ** 2 + (gx - px) ** 2 < (A + pa + 3) ** 2 for py, px, pa in placed):
            continue
        t = np.linspace(0, 2 * math.pi, 16, endpoint=False)
        ry = gy + 1.15 * (A * np.cos(t) * math.sin(ang) + B * np.sin(t) * math.cos(ang))
        rx = gx + 1.15 * (A * np.cos(t) * math.cos(ang) - B * np.sin(t) * math.sin(ang))
        py_, px_ = _inside(size, np.append(ry, gy), np.append(rx, gx))
        if mask[py_, px_].any():
            continue
        placed.append((gy, gx, A))
        area += math.pi * A * B
        # rasterise the gland on its bounding box
        R = int(math.ceil(A)) + 2
        y0, y1 = max(int(gy) - R, 0), min(int(gy) + R + 1, size)
        x0, x1 = max(int(gx) - R, 0), min(int(gx) + R + 1, size)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = np.arange(y0, y1, dtype=np.float32)[:, None] - gy
        xx = np.arange(x0, x1, dtype=np.float32)[None, :] - gx
        u = xx * math.cos(ang) + yy * math.sin(ang)
        v = yy * math.cos(ang) - xx * math.sin(ang)
        wob = 1.0 + 0.04 * np.cos(3 * np.arctan2(v, u) + rng.uniform(0, 6.3))
        rho = np.sqrt((u / A) ** 2 + (v / B) ** 2) / wob
        lumen_r = rng.uniform(0.28, 0.45)
        band = np.clip((1.0 - rho) * A * 0.8, 0, 1)  # soft outer edge of the epithelium
        lum = np.clip((lumen_r - rho) * A * 0.8, 0, 1)
        sl = (slice(y0, y1), slice(x0, x1))
        cyto_e = rng.uniform(0.16, 0.26)
        E[sl] = E[sl] * (1 - band) + band * cyto_e
        H[sl] = H[sl] * (1 - band) + band * rng.uniform(0.06, 0.10)
        white[sl] = np.maximum(white[sl], lum * rng.uniform(0.85, 0.97))
        # basal nuclei: regular, evenly spaced, elongated radially
        rn = lumen_r + rng.uniform(0.72, 0.8) * (1.0 - lumen_r)
        perim = math.pi * (3 * (A + B) - math.sqrt((3 * A + B) * (A + 3 * B))) * rn
        k = max(int(perim / rng.uniform(3.3, 3.8)), 6)
        t = np.linspace(0, 2 * math.pi, k, endpoint=False) + rng.uniform(0, 6.3)
        t = t + rng.normal(0, 0.03, k)
        eu, ev = A * rn * np.cos(t), B * rn * np.sin(t)
        ny = gy + eu * math.sin(ang) + ev * math.cos(ang)
        nx = gx + eu * math.cos(ang) - ev * math.sin(ang)
        normal = np.arctan2(A * np.sin(t), B * np.cos(t)) + ang
        keep = (ny >= 0) & (ny < size) & (nx >= 0) & (nx < size)
        if keep.any():
            n = int(keep.sum())
            nuclei.add(
                ny[keep],
                nx[keep],
                rng.normal(3.3, 0.15, n),
                rng.normal(1.6, 0.08, n),
                normal[keep] + rng.normal(0, 0.08, n),
                rng.normal(1.05, 0.05, n),
            )


def _sample_points(rng: np.random.Generator, allowed: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n uniform random points (float y, x) inside the True pixels of `allowed`."""
    idx = np.flatnonzero(allowed)
    if n <= 0 or idx.size == 0:
        return np.zeros(0), np.zeros(0)
    pick = idx[rng.integers(0, idx.size, n)]
    w = allowed.shape[1]
    return pick // w + rng.random(n), pick % w + rng.random(n)


# ----------------------------------------------------------------------------------------------
# public API


def synth_image(
    rng: np.random.Generator, size: int = 256, tumour_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (size,size,3) RGB image and bool (size,size) exact tumour mask.

    tumour_fraction 0 => negative (mask all False); 1 => the whole patch is tumour; in between, an
    irregular region of about that fraction of the pixels. All randomness comes from `rng`.
    """
    size = int(size)
    if size < MIN_SIZE:
        raise IkdmilError(f"synthetic image size {size} is too small; use --size {MIN_SIZE} or more")
    f = float(tumour_fraction)
    if not 0.0 <= f <= 1.0:
        raise IkdmilError(f"tumour_fraction must be between 0 and 1, got {tumour_fraction}")
    S = size
    shape = (S, S)
    area = float(S * S)

    mask = _tumour_mask(rng, S, f)
    normal = ~mask
    has_normal = bool(normal.any())
    has_tumour = bool(mask.any())

    # ---- stroma: eosin with collagen streaks, low-frequency variation, white clefts
    fib_angle = rng.uniform(0, 180)
    fib = _streaks(
        rng,
        S,
        fib_angle,
        [(0.65, rng.uniform(1.6, 2.6), rng.uniform(18, 45)), (0.45, rng.uniform(2.5, 4.0), rng.uniform(25, 60))],
    )
    low = _noise(rng, S, rng.uniform(40, 90))
    e_stroma = rng.uniform(0.38, 0.52)
    E = np.clip(e_stroma * (0.70 + 0.28 * np.tanh(1.3 * fib) + 0.12 * low), 0.02, None).astype(np.float32)
    H = np.clip(0.035 + 0.015 * low + 0.008 * fib, 0.0, None).astype(np.float32)
    chrom = _noise(rng, S, 2.5)  # chromatin grain, shared by all nuclei
    cleft = 0.75 * _noise(rng, S, rng.uniform(18, 40)) + 0.55 * fib
    thr = rng.uniform(1.45, 2.4)
    white = np.clip((cleft - thr) * 2.5, 0.0, 1.0).astype(np.float32)

    # ---- normal tissue (only drawn where the mask is False)
    Hn, En, Wn = H.copy(), E.copy(), white.copy()
    nuc = _Nuclei()
    if has_normal:
        _glands(rng, S, mask, Hn, En, Wn, nuc, cover=rng.choice([0.0, rng.uniform(0.2, 0.55)], p=[0.1, 0.9]))
        free = normal & (Wn < 0.3)
        # lymphocytes: small, round, dark
        n = rng.poisson(area * rng.uniform(0.0008, 0.003))
        y, x = _sample_points(rng, free, n)
        r = rng.normal(2.5, 0.2, len(y))
        nuc.add(y, x, r, r * rng.uniform(0.9, 1.0, len(y)), rng.uniform(0, math.pi, len(y)), rng.normal(1.35, 0.08, len(y)))
        # fibroblasts: thin spindles along the collagen
        n = rng.poisson(area * rng.uniform(0.0006, 0.0016))
        y, x = _sample_points(rng, free, n)
        nuc.add(
            y,
            x,
            rng.uniform(3.8, 5.5, len(y)),
            rng.uniform(1.0, 1.4, len(y)),
            -math.radians(fib_angle) + rng.normal(0, 0.2, len(y)),
            rng.normal(1.0, 0.08, len(y)),
        )
        # sometimes a dense lymphoid aggregate: dark, crowded, but small and round and benign
        if rng.random() < 0.4 and normal.mean() > 0.35:  # needs room; a sliver stays ordinary tissue
            ay, ax = _sample_points(rng, free, 1)
            if len(ay):
                rad = rng.uniform(16, 40)
                n = int(math.pi * rad * rad * 0.06)
                d = rad * np.sqrt(rng.random(n))
                t = rng.uniform(0, 2 * math.pi, n)
                y, x = ay[0] + d * np.sin(t), ax[0] + d * np.cos(t)
                ok = (y >= 0) & (y < S) & (x >= 0) & (x < S)
                y, x = y[ok], x[ok]
                iy, ix = _inside(S, y, x)
                ok = normal[iy, ix]
                y, x = y[ok], x[ok]
                r = rng.normal(2.5, 0.2, len(y))
                nuc.add(y, x, r, r * 0.95, rng.uniform(0, math.pi, len(y)), rng.normal(1.35, 0.08, len(y)))
        cy, cx, a, b, th, dn = nuc.arrays()
        if len(cy):
            iy, ix = _inside(S, cy, cx)
            ok = normal[iy, ix]
            cy, cx, a, b, th, dn = (v[ok] for v in (cy, cx, a, b, th, dn))
        Hn = Hn * (1 - Wn)
        En = En * (1 - Wn)
        dsum, csum = _stamp(shape, cy, cx, a, b, th, dn)
        occ = np.minimum(csum, 1.0)
        Hn = Hn * (1 - occ) + dsum * (1.0 + 0.08 * chrom)
        En = En * (1 - 0.75 * occ)

    # ---- tumour tissue (only drawn where the mask is True)
    if has_tumour:
        tl = _noise(rng, S, rng.uniform(10, 25))
        Et = np.clip(rng.uniform(0.22, 0.32) * (1.0 + 0.15 * tl), 0.02, None).astype(np.float32)
        Ht = np.clip(rng.uniform(0.1, 0.15) * (1.0 + 0.2 * tl), 0.0, None).astype(np.float32)
        # thin strands of stroma running through the sheets
        strand = np.clip(1.0 - np.abs(_noise(rng, S, rng.uniform(20, 40))) * rng.uniform(2.5, 5.0), 0, 1)
        Et = Et * (1 - strand) + E * strand
        Ht = Ht * (1 - strand) + H * strand
        Wt = np.zeros(shape, np.float32)
        # cribriform holes / gland remnants punched into the sheets
        n_holes = rng.poisson(float(mask.sum()) / 2000.0 * rng.uniform(0.2, 1.5))
        hy, hx = _sample_points(rng, mask, n_holes)
        if len(hy):
            hr = rng.uniform(2.5, 8.0, len(hy))
            ones = np.ones(len(hy))
            hole, _ = _stamp(shape, hy, hx, hr, hr * rng.uniform(0.7, 1.0, len(hy)), rng.uniform(0, 3.2, len(hy)), ones)
            Wt = np.maximum(Wt, np.minimum(hole, 1.0) * 0.95)
        Ht = Ht * (1 - Wt)
        Et = Et * (1 - Wt)
        # crowded, large, pleomorphic, hyperchromatic nuclei in random orientations
        cover = rng.uniform(0.35, 0.55)
        mean_area = math.pi * 5.6 * 4.0
        n = int(rng.poisson(float(mask.sum()) * cover / mean_area))
        y, x = _sample_points(rng, mask & (Wt < 0.3), n)
        n = len(y)
        a = np.clip(rng.lognormal(math.log(5.6), 0.2, n), 3.8, 9.5)
        b = a * rng.uniform(0.5, 0.9, n)
        irr = np.stack(
            [rng.uniform(0, 0.14, n), rng.uniform(0, 0.1, n), rng.uniform(0, 6.3, n), rng.uniform(0, 6.3, n)], 1
        )
        dn = np.clip(rng.normal(1.15, 0.2, n), 0.8, 1.8)
        dsum, csum = _stamp(shape, y, x, a, b, rng.uniform(0, math.pi, n), dn, irr, rim=0.3)
        # prominent nucleoli in some nuclei
        sel = rng.random(n) < 0.4
        if sel.any():
            m = int(sel.sum())
            ny = y[sel] + rng.normal(0, 1.0, m)
            nx = x[sel] + rng.normal(0, 1.0, m)
            ok = (ny >= 0) & (ny < S) & (nx >= 0) & (nx < S)
            rr = rng.uniform(0.9, 1.4, int(ok.sum()))
            d2, _ = _stamp(shape, ny[ok], nx[ok], rr, rr, np.zeros(len(rr)), np.full(len(rr), 0.7))
            dsum += d2 * (csum > 0.5)
        occ = np.minimum(csum, 1.0)
        Ht = Ht * (1 - occ) + dsum * (1.0 + 0.22 * chrom)
        Et = Et * (1 - 0.8 * occ)
        H = np.where(mask, Ht, Hn)
        E = np.where(mask, Et, En)
    else:
        H, E = Hn, En

    # ---- optics: a little blur, per-image stain jitter, Beer–Lambert, sensor noise
    H = np.minimum(H, 3.5)
    blur = rng.uniform(0.45, 0.9)
    H = ndimage.gaussian_filter(H, blur)
    E = ndimage.gaussian_filter(E, blur)
    od_h = _unit(np.abs(OD_HAEMATOXYLIN / np.linalg.norm(OD_HAEMATOXYLIN) + rng.normal(0, 0.07, 3)) + 0.01)
    od_e = _unit(np.abs(OD_EOSIN / np.linalg.norm(OD_EOSIN) + rng.normal(0, 0.07, 3)) + 0.01)
    od_r = _unit(np.abs(np.cross(od_h, od_e)) + 0.05)
    thick = float(np.clip(rng.lognormal(0.0, 0.25), 0.6, 1.7))
    s_h = thick * float(np.clip(rng.lognormal(0.0, 0.3), 0.55, 1.8))
    s_e = thick * float(np.clip(rng.lognormal(0.0, 0.3), 0.5, 2.0))
    resid = np.clip(0.03 + 0.03 * low, 0, None) * rng.uniform(0.0, 1.5)
    od = (
        (s_h * H)[..., None] * od_h.astype(np.float32)
        + (s_e * E)[..., None] * od_e.astype(np.float32)
        + resid[..., None] * od_r.astype(np.float32)
    )
    i0 = rng.uniform(195.0, 252.0) * (1.0 + rng.normal(0, 0.02, 3))
    rgb = np.exp(-od) * i0.astype(np.float32)
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(rng.uniform(1.0, 3.0))
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mask


def _split_plan(n: int, val_fraction: float, test_fraction: float, pos_fraction: float) -> list[tuple[str, int]]:
    """(split, label) for each image index; every split gets at least one image of each class."""
    n_val = max(2, int(round(n * val_fraction)))
    n_test = max(2, int(round(n * test_fraction)))
    n_train = n - n_val - n_test
    if n_train < 2:
        raise IkdmilError(
            f"n={n} with val_fraction={val_fraction} and test_fraction={test_fraction} leaves {n_train} "
            "training image(s); every split needs at least one positive and one negative: raise n or "
            "lower the fractions"
        )
    plan: list[tuple[str, int]] = []
    for split, m in zip(SPLITS, (n_train, n_val, n_test)):
        n_pos = min(max(int(round(m * pos_fraction)), 1), m - 1)
        # interleave the classes evenly (no shuffling needed: each image's content depends only on
        # (seed, index), never on its neighbours)
        labels = [int(math.floor((j + 1) * n_pos / m) > math.floor(j * n_pos / m)) for j in range(m)]
        plan.extend((split, lab) for lab in labels)
    return plan


def make_synthetic_dataset(
    out,
    n: int = 240,
    seed: int = 0,
    size: int = 256,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    pos_fraction: float = 0.5,
    progress: bool = True,
) -> Path:
    """Write out/{train,val,test}/{pos,neg,masks}/NAME.png and out/manifest.csv; return the manifest path.

    Every image has a mask (0/255 PNG; all zero for negatives). Image i is generated from
    ``np.random.default_rng([seed, i])``, so the output is deterministic by seed. Positives get tumour
    fractions from small foci (~4%) to whole patches (100%), handed out in turn within each split.
    Also writes out/synth.json with the generator parameters.
    """
    try:
        n = int(n)
        seed = int(seed)
        size = int(size)
        val_fraction, test_fraction, pos_fraction = float(val_fraction), float(test_fraction), float(pos_fraction)
    except (TypeError, ValueError) as exc:
        raise IkdmilError(f"synthetic dataset options must be numbers: {exc}") from None
    if n < MIN_IMAGES:
        raise IkdmilError(
            f"n={n} synthetic images is too few; use at least {MIN_IMAGES} so each of train/val/test "
            "gets a positive and a negative"
        )
    if seed < 0:
        raise IkdmilError(f"seed must be a non-negative integer, got {seed}")
    if size < MIN_SIZE:
        raise IkdmilError(f"synthetic image size {size} is too small; use {MIN_SIZE} or more")
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < v < 1.0:
            raise IkdmilError(f"{name} must be between 0 and 1 (exclusive), got {v}")
    if val_fraction + test_fraction >= 1.0:
        raise IkdmilError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction:g} leaves nothing to train on; "
            "keep their sum below 1"
        )
    if not 0.0 < pos_fraction < 1.0:
        raise IkdmilError(f"pos_fraction must be between 0 and 1 (exclusive), got {pos_fraction}")

    plan = _split_plan(n, val_fraction, test_fraction, pos_fraction)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    pos_seen = {s: 0 for s in SPLITS}
    samples: list[Sample] = []
    for i in tqdm(range(n), desc="synthesising", unit="img", disable=not progress):
        split, label = plan[i]
        rng = np.random.default_rng([seed, i])
        frac = 0.0
        if label:
            base = POSITIVE_FRACTIONS[pos_seen[split] % len(POSITIVE_FRACTIONS)]
            pos_seen[split] += 1
            frac = 1.0 if base >= 1.0 else float(np.clip(base * rng.uniform(0.8, 1.2), 0.03, 0.95))
        image, mask = synth_image(rng, size=size, tumour_fraction=frac)
        name = f"synth_{i:0{width}d}.png"
        img_path = out / split / ("pos" if label else "neg") / name
        mask_path = out / split / "masks" / name
        write_png(img_path, image)
        write_png(mask_path, mask)
        samples.append(Sample(img_path, label, mask_path, split))
    manifest = write_manifest(samples, out / MANIFEST_NAME)
    params = {
        "generator": "ikdmil.data.synth",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n": n,
        "size": size,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "pos_fraction": pos_fraction,
    }
    write_text(out / "synth.json", json.dumps(params, indent=2) + "\n")
    return manifest

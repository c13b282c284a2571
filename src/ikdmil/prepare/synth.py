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
Sizes are in pixels at roughly 0.5 µm/px (`SYNTH_MPP`, the value the manifest states for every image):
a bigger patch shows more tissue, not bigger cells.
"""

from __future__ import annotations

import json
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.special import ndtri
from tqdm import tqdm

from ikdmil.data.manifest import MANIFEST_NAME, SPLITS, Sample, write_manifest
from ikdmil.errors import IkdmilError
from ikdmil.io import atomic_path, write_png, write_text

GENERATOR_VERSION = 1
SYNTH_MPP = 0.5  # µm/px the drawing's nuclei and glands are sized for (20x-like); recorded in the manifest
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
    span = size / cell  # grid cells across the output
    n = int(math.ceil(span)) + 3
    grid = rng.standard_normal((n, n)).astype(np.float32)
    # bicubic upsampling of the interior of the grid (one cell of margin, so edges see real data)
    up = Image.fromarray(grid).resize((size, size), Image.BICUBIC, box=(1.0, 1.0, 1.0 + span, 1.0 + span))
    return _normalise(np.asarray(up))


def _fibres(
    rng: np.random.Generator, size: int, angle: float, across: float, warp: np.ndarray, warp_px: float
) -> np.ndarray:
    """Unit-std wavy stripes `across` px wide running at `angle` radians, bent by `warp` (unit std)."""
    yy = np.arange(size, dtype=np.float32)[:, None]
    xx = np.arange(size, dtype=np.float32)[None, :]
    v = yy * np.float32(math.cos(angle)) - xx * np.float32(math.sin(angle)) + np.float32(warp_px) * warp
    lo = float(v.min()) - across
    n = int((float(v.max()) - lo) / across) + 3
    profile = rng.standard_normal(n)
    stripes = np.interp(v.ravel(), lo + across * np.arange(n), profile).reshape(size, size)
    return stripes.astype(np.float32)


def _ellipse_groups(
    cy: np.ndarray,
    cx: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    irregular: np.ndarray | None = None,
    quantum: int = 1,
):
    """Evaluate N ellipses on small boxes around their centres, grouped by box radius.

    Yields (sel, r, iy, ix, rho, extent): the indices of the ellipses in the group, their common box
    radius r, integer centres, the normalised radius rho (len(sel), 2r+1, 2r+1) (< 1 inside), and a
    (len(sel), 1, 1) mean semi-axis for anti-aliasing. `irregular` (N, 4) holds the amplitudes and
    phases of a 2nd and 3rd harmonic wobble of the outline. Box radii are rounded up to a multiple
    of `quantum` so that ellipses of similar size share one vectorised group.
    """
    grow = 1.0 + (np.abs(irregular[:, 0]) + np.abs(irregular[:, 1]) if irregular is not None else 0.0)
    rad = np.ceil(np.maximum(a, b) * grow).astype(np.int64) + 2
    rad = -(-rad // quantum) * quantum
    for r in np.unique(rad):
        sel = np.flatnonzero(rad == r)
        off = np.arange(-r, r + 1, dtype=np.float32)
        iy = np.floor(cy[sel]).astype(np.int64)
        ix = np.floor(cx[sel]).astype(np.int64)
        dy = off[None, :, None] - (cy[sel] - iy).astype(np.float32)[:, None, None]
        dx = off[None, None, :] - (cx[sel] - ix).astype(np.float32)[:, None, None]
        ct = np.cos(theta[sel]).astype(np.float32)[:, None, None]
        st = np.sin(theta[sel]).astype(np.float32)[:, None, None]
        ua = (dx * ct + dy * st) * (1.0 / a[sel]).astype(np.float32)[:, None, None]
        vb = (dy * ct - dx * st) * (1.0 / b[sel]).astype(np.float32)[:, None, None]
        rho = np.sqrt(ua * ua + vb * vb)
        if irregular is not None:
            phi = np.arctan2(vb, ua)
            e2, e3, p2, p3 = (irregular[sel, k].astype(np.float32)[:, None, None] for k in range(4))
            rho /= 1.0 + e2 * np.cos(2.0 * phi + p2) + e3 * np.cos(3.0 * phi + p3)
        extent = (0.5 * (a[sel] + b[sel])).astype(np.float32)[:, None, None]
        yield sel, int(r), iy, ix, rho, extent


class _Canvas:
    """Sums weighted box pixels into (size, size) maps with one bincount per map."""

    def __init__(self, size: int, pad: int) -> None:
        self.size, self.pad = size, pad
        self.wp = size + 2 * pad
        self.flat: list[np.ndarray] = []
        self.weights: dict[str, list[np.ndarray]] = {}

    def add(self, r: int, iy: np.ndarray, ix: np.ndarray, **weights: np.ndarray) -> None:
        off = np.arange(-r, r + 1)
        p = self.pad
        flat = (iy[:, None, None] + (p + off)[None, :, None]) * self.wp + (ix[:, None, None] + (p + off)[None, None, :])
        self.flat.append(flat.ravel())
        for k, w in weights.items():
            self.weights.setdefault(k, []).append(np.broadcast_to(w, flat.shape).ravel())

    def maps(self, *names: str) -> list[np.ndarray]:
        n, p = self.size, self.pad
        if not self.flat:
            return [np.zeros((n, n), np.float32) for _ in names]
        flat = np.concatenate(self.flat)
        out = []
        for k in names:
            m = np.bincount(flat, weights=np.concatenate(self.weights[k]), minlength=self.wp * self.wp)
            out.append(m.reshape(self.wp, self.wp)[p : p + n, p : p + n].astype(np.float32))
        return out


def _pad_for(a: np.ndarray, b: np.ndarray, wobble: float = 0.0) -> int:
    return int(math.ceil(float(np.max(np.maximum(a, b), initial=1.0)) * (1.0 + wobble))) + 3


def _stamp(
    size: int,
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

    a, b: semi-axes (px) along / across `theta` (radians); dens: haematoxylin concentration of each
    nucleus; rim > 0 makes the centre paler than the membrane (vesicular chromatin).
    """
    wob = float(np.abs(irregular[:, :2]).sum(1).max(initial=0.0)) if irregular is not None and len(cy) else 0.0
    canvas = _Canvas(size, _pad_for(a, b, wob))
    for sel, r, iy, ix, rho, extent in _ellipse_groups(cy, cx, a, b, theta, irregular):
        alpha = np.clip(0.5 + (1.0 - rho) * extent, 0.0, 1.0)
        val = alpha * dens[sel].astype(np.float32)[:, None, None]
        if rim > 0:
            val *= 1.0 - rim * np.clip(1.0 - 1.25 * rho, 0.0, 1.0)
        canvas.add(r, iy, ix, dens=val, cover=alpha)
    d, c = canvas.maps("dens", "cover")
    return d, c


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
    k = min(max(k, 0), field.size - 2)  # at least one tumour pixel for any fraction > 0
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


def _place_glands(rng: np.random.Generator, size: int, mask: np.ndarray, cover: float):
    """Gland ellipses (A, B, ang, gy, gx) covering about `cover` of the tumour-free area, touching
    neither each other nor the mask; None when there is no room."""
    target = cover * float((~mask).sum())
    if target <= 0:
        return None
    m = 64
    A = rng.uniform(11, 26, m)
    B = A * rng.uniform(0.55, 0.95, m)
    ang = rng.uniform(0, math.pi, m)
    gy = rng.uniform(-0.3 * A, size + 0.3 * A)
    gx = rng.uniform(-0.3 * A, size + 0.3 * A)
    # reject candidates whose outline (with a margin) or centre touches the tumour
    t = np.linspace(0, 2 * math.pi, 16, endpoint=False)
    ca, sa = np.cos(ang)[:, None], np.sin(ang)[:, None]
    eu, ev = 1.15 * A[:, None] * np.cos(t), 1.15 * B[:, None] * np.sin(t)
    ry = np.concatenate([gy[:, None] + eu * sa + ev * ca, gy[:, None]], 1)
    rx = np.concatenate([gx[:, None] + eu * ca - ev * sa, gx[:, None]], 1)
    clear = ~mask[_inside(size, ry, rx)].any(1)
    chosen: list[int] = []
    area = 0.0
    for i in np.flatnonzero(clear).tolist():
        if area >= target:
            break
        if any((gy[i] - gy[j]) ** 2 + (gx[i] - gx[j]) ** 2 < (A[i] + A[j] + 3) ** 2 for j in chosen):
            continue
        chosen.append(i)
        area += math.pi * A[i] * B[i]
    if not chosen:
        return None
    g = np.array(chosen)
    return A[g], B[g], ang[g], gy[g], gx[g]


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
    """Draw normal glands (pale lumen, cytoplasm ring, evenly spaced basal nuclei) outside the mask.

    Glands cover about `cover` of the tumour-free area, do not touch each other or the mask, and are
    written into H, E (stain concentrations) and white (lumen) in place; their nuclei go to `nuclei`.
    """
    placed = _place_glands(rng, size, mask, cover)
    if placed is None:
        return
    A, B, ang, gy, gx = placed
    n = len(A)
    lumen_r = rng.uniform(0.28, 0.45, n)
    cyto_e = rng.uniform(0.16, 0.26)
    cyto_h = rng.uniform(0.06, 0.10)
    lum_w = rng.uniform(0.85, 0.97, n)
    wobble = np.stack([np.zeros(n), np.full(n, 0.04), np.zeros(n), rng.uniform(0, 6.3, n)], 1)
    canvas = _Canvas(size, int(math.ceil(float(A.max()) * 1.35)) + 12)
    for sel, r, iy, ix, rho, _ in _ellipse_groups(gy, gx, A, B, ang, wobble, quantum=8):
        soft = (0.8 * A[sel]).astype(np.float32)[:, None, None]
        band = np.clip((1.0 - rho) * soft, 0, 1)  # epithelium, soft outer edge
        lum = np.clip((lumen_r[sel].astype(np.float32)[:, None, None] - rho) * soft, 0, 1)
        canvas.add(r, iy, ix, band=band, lum=lum * lum_w[sel].astype(np.float32)[:, None, None])
    band, lum = canvas.maps("band", "lum")
    band = np.minimum(band, 1.0)
    E *= 1.0 - band
    E += band * np.float32(cyto_e)
    H *= 1.0 - band
    H += band * np.float32(cyto_h)
    np.maximum(white, lum, out=white)
    _basal_nuclei(rng, size, A, B, ang, gy, gx, lumen_r, nuclei)


def _basal_nuclei(rng: np.random.Generator, size: int, A, B, ang, gy, gx, lumen_r, nuclei: _Nuclei) -> None:
    """Basal nuclei of each gland: regular size, evenly spaced, elongated along the gland's radius."""
    n = len(A)
    rn = lumen_r + rng.uniform(0.72, 0.8, n) * (1.0 - lumen_r)
    perim = math.pi * (3 * (A + B) - np.sqrt((3 * A + B) * (A + 3 * B))) * rn
    k = np.maximum((perim / rng.uniform(3.3, 3.8, n)).astype(np.int64), 6)
    gid = np.repeat(np.arange(n), k)
    j = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
    t = 2 * math.pi * j / k[gid] + rng.uniform(0, 6.3, n)[gid] + rng.normal(0, 0.03, len(gid))
    eu, ev = A[gid] * rn[gid] * np.cos(t), B[gid] * rn[gid] * np.sin(t)
    ny = gy[gid] + eu * np.sin(ang[gid]) + ev * np.cos(ang[gid])
    nx = gx[gid] + eu * np.cos(ang[gid]) - ev * np.sin(ang[gid])
    radial = np.arctan2(A[gid] * np.sin(t), B[gid] * np.cos(t)) + ang[gid]
    keep = (ny >= 0) & (ny < size) & (nx >= 0) & (nx < size)
    m = int(keep.sum())
    nuclei.add(
        ny[keep],
        nx[keep],
        rng.normal(3.3, 0.15, m),
        rng.normal(1.6, 0.08, m),
        radial[keep] + rng.normal(0, 0.08, m),
        rng.normal(1.05, 0.05, m),
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


def _stroma(rng: np.random.Generator, S: int):
    """Stroma everywhere: (H, E, white, fib_angle, low, chrom) stain densities and shared fields."""
    # ---- stroma: eosin with collagen streaks, low-frequency variation, white clefts
    fib_angle = rng.uniform(0, math.pi)
    low = _noise(rng, S, rng.uniform(40, 90))
    warp = _noise(rng, S, rng.uniform(35, 70))
    wavy = rng.uniform(3, 10)
    fib = 0.65 * _fibres(rng, S, fib_angle, rng.uniform(1.6, 2.6), warp, wavy) * np.tanh(
        1.0 + _noise(rng, S, rng.uniform(15, 35))
    ) + 0.45 * _fibres(rng, S, fib_angle + rng.uniform(-0.5, 0.5), rng.uniform(2.5, 4.0), warp, wavy)
    fib = _normalise(fib)
    e_stroma = rng.uniform(0.38, 0.52)
    E = np.clip(e_stroma * (0.70 + 0.28 * np.tanh(1.3 * fib) + 0.12 * low), 0.02, None).astype(np.float32)
    H = np.clip(0.035 + 0.015 * low + 0.008 * fib, 0.0, None).astype(np.float32)
    chrom = _noise(rng, S, 2.5)  # chromatin grain, shared by all nuclei
    # clefts / glass: how much of the tissue is torn or empty varies a lot between patches
    cleft = (0.75 * _noise(rng, S, rng.uniform(18, 40)) + 0.55 * fib) * np.float32(1.0 / 0.93)
    empty = rng.choice(3, p=[0.5, 0.35, 0.15])
    empty = rng.uniform(*((0.01, 0.06), (0.06, 0.16), (0.16, 0.3))[empty])
    white = np.clip((cleft - np.float32(ndtri(1.0 - empty))) * 2.5, 0.0, 1.0).astype(np.float32)

    return H, E, white, fib_angle, low, chrom


def _normal_tissue(rng: np.random.Generator, S: int, mask: np.ndarray, H: np.ndarray, E: np.ndarray,
                   white: np.ndarray, fib_angle: float, chrom: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normal tissue where `mask` is False: glands, lymphocytes, fibroblasts, sometimes an aggregate."""
    normal = ~mask
    Hn, En, Wn = H.copy(), E.copy(), white.copy()
    nuc = _Nuclei()
    _glands(rng, S, mask, Hn, En, Wn, nuc, cover=rng.choice([0.0, rng.uniform(0.2, 0.55)], p=[0.1, 0.9]))
    free = normal & (Wn < 0.3)
    free_area = float(free.sum())
    # lymphocytes: small, round, dark (some patches have inflamed stroma: many more of them)
    n = rng.poisson(free_area * (rng.uniform(0.003, 0.007) if rng.random() < 0.15 else rng.uniform(0.0008, 0.003)))
    y, x = _sample_points(rng, free, n)
    r = rng.normal(2.5, 0.2, len(y))
    nuc.add(y, x, r, r * rng.uniform(0.9, 1.0, len(y)), rng.uniform(0, math.pi, len(y)), rng.normal(1.35, 0.08, len(y)))
    # fibroblasts: thin spindles along the collagen
    n = rng.poisson(free_area * rng.uniform(0.0006, 0.0016))
    y, x = _sample_points(rng, free, n)
    nuc.add(
        y,
        x,
        rng.uniform(3.8, 5.5, len(y)),
        rng.uniform(1.0, 1.4, len(y)),
        fib_angle + rng.normal(0, 0.2, len(y)),
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
    dsum, csum = _stamp(S, cy, cx, a, b, th, dn)
    occ = np.minimum(csum, 1.0)
    Hn = Hn * (1 - occ) + dsum * (1.0 + 0.08 * chrom)
    En = En * (1 - 0.75 * occ)
    return Hn, En


def _tumour_tissue(rng: np.random.Generator, S: int, mask: np.ndarray, H: np.ndarray, E: np.ndarray,
                   chrom: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tumour where `mask` is True: stroma strands, cribriform holes, crowded pleomorphic nuclei."""
    shape = (S, S)
    tl = _noise(rng, S, rng.uniform(10, 25))
    Et = np.clip(rng.uniform(0.22, 0.32) * (1.0 + 0.15 * tl), 0.02, None).astype(np.float32)
    Ht = np.clip(rng.uniform(0.06, 0.1) * (1.0 + 0.2 * tl), 0.0, None).astype(np.float32)
    # thin strands of stroma running through the sheets
    strand = np.clip(1.0 - np.abs(_noise(rng, S, rng.uniform(20, 40))) * rng.uniform(2.5, 5.0), 0, 1)
    Et = Et * (1 - strand) + E * strand
    Ht = Ht * (1 - strand) + H * strand
    Wt = np.zeros(shape, np.float32)
    # cribriform holes / gland remnants punched into the sheets, crowded by nuclei at their rims
    n_holes = rng.poisson(float(mask.sum()) / 1000.0 * rng.uniform(0.2, 1.2))
    hy, hx = _sample_points(rng, mask, n_holes)
    ry, rx = np.zeros(0), np.zeros(0)
    if len(hy):
        hr = rng.uniform(3.0, 9.0, len(hy))
        ones = np.ones(len(hy))
        hole, _ = _stamp(S, hy, hx, hr, hr * rng.uniform(0.7, 1.0, len(hy)), rng.uniform(0, 3.2, len(hy)), ones)
        Wt = np.maximum(Wt, np.minimum(hole, 1.0) * 0.95)
        k = np.maximum((2 * math.pi * (hr + 4.5) / rng.uniform(9, 13, len(hy))).astype(np.int64), 2)
        hid = np.repeat(np.arange(len(hy)), k)
        t = rng.uniform(0, 2 * math.pi, len(hid))
        d = hr[hid] + rng.uniform(3.5, 6.0, len(hid))
        ry, rx = hy[hid] + d * np.sin(t), hx[hid] + d * np.cos(t)
        ok = (ry >= 0) & (ry < S) & (rx >= 0) & (rx < S)
        ry, rx = ry[ok], rx[ok]
        ok = mask[_inside(S, ry, rx)]
        ry, rx = ry[ok], rx[ok]
    Ht = Ht * (1 - Wt)
    Et = Et * (1 - Wt)
    # crowded, large, pleomorphic, hyperchromatic nuclei in random orientations
    cover = rng.uniform(0.22, 0.4)
    mean_area = math.pi * 5.6 * 4.0
    n = int(rng.poisson(float(mask.sum()) * cover / mean_area))
    y, x = _sample_points(rng, mask & (Wt < 0.3), n)
    y, x = np.concatenate([ry, y]), np.concatenate([rx, x])
    n = len(y)
    a = np.clip(rng.lognormal(math.log(5.6), 0.2, n), 3.8, 9.5)
    b = a * rng.uniform(0.5, 0.9, n)
    irr = np.stack(
        [rng.uniform(0, 0.14, n), rng.uniform(0, 0.1, n), rng.uniform(0, 6.3, n), rng.uniform(0, 6.3, n)], 1
    )
    dn = np.clip(rng.normal(1.05, 0.2, n), 0.7, 1.6)
    dsum, csum = _stamp(S, y, x, a, b, rng.uniform(0, math.pi, n), dn, irr, rim=0.3)
    # prominent nucleoli in some nuclei
    sel = rng.random(n) < 0.4
    if sel.any():
        m = int(sel.sum())
        ny = y[sel] + rng.normal(0, 1.0, m)
        nx = x[sel] + rng.normal(0, 1.0, m)
        ok = (ny >= 0) & (ny < S) & (nx >= 0) & (nx < S)
        rr = rng.uniform(0.9, 1.4, int(ok.sum()))
        d2, _ = _stamp(S, ny[ok], nx[ok], rr, rr, np.zeros(len(rr)), np.full(len(rr), 0.7))
        dsum += d2 * (csum > 0.5)
    occ = np.minimum(csum, 1.0)
    Ht = Ht * (1 - occ) + dsum * (1.0 + 0.22 * chrom)
    Et = Et * (1 - 0.8 * occ)
    return Ht, Et


def _optics(rng: np.random.Generator, H: np.ndarray, E: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Stain densities to RGB: a little blur, per-image stain jitter, Beer-Lambert, sensor noise."""
    H = np.minimum(H, 3.5)
    blur = rng.uniform(0.45, 0.9)
    H = ndimage.gaussian_filter(H, blur)
    E = ndimage.gaussian_filter(E, blur)
    od_h = _unit(np.abs(OD_HAEMATOXYLIN / np.linalg.norm(OD_HAEMATOXYLIN) + rng.normal(0, 0.07, 3)) + 0.01)
    # eosin's red absorption differs a lot between protocols (estimated vectors range ~0.05-0.35)
    od_e = _unit(np.abs(OD_EOSIN / np.linalg.norm(OD_EOSIN) + rng.normal(0, 0.07, 3))
                 + [rng.uniform(0, 0.28), 0.0, 0.01])
    od_r = _unit(np.abs(np.cross(od_h, od_e)) + 0.05)
    thick = float(np.clip(rng.lognormal(0.0, 0.35), 0.45, 2.0))
    s_h = thick * float(np.clip(rng.lognormal(0.0, 0.35), 0.5, 2.0))
    s_e = thick * float(np.clip(rng.lognormal(0.0, 0.3), 0.5, 2.0))
    resid = np.clip(0.03 + 0.03 * low, 0, None) * rng.uniform(0.0, 1.5)
    stains = np.stack([s_h * od_h, s_e * od_e, od_r]).astype(np.float32)  # rows: OD per unit concentration
    od = np.stack([H, E, resid.astype(np.float32)], axis=-1) @ stains
    i0 = rng.uniform(165.0, 252.0) * (1.0 + rng.normal(0, 0.03, 3))
    rgb = np.exp(-od, out=od)
    rgb *= i0.astype(np.float32)
    grain = rng.random(rgb.shape, dtype=np.float32) - np.float32(0.5)
    rgb += grain * np.float32(rng.uniform(3.5, 10.0))  # sensor noise, uniform with std 1-3 levels
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
def synth_image(
    rng: np.random.Generator, size: int = 256, tumour_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (size,size,3) RGB image and bool (size,size) exact tumour mask.

    tumour_fraction 0 => negative (mask all False); 1 => the whole patch is tumour; in between, an
    irregular region of about that fraction of the pixels. All randomness comes from `rng`.
    """
    size = int(size)
    if size < MIN_SIZE:
        raise IkdmilError(f"synthetic image size {size} px is too small; use {MIN_SIZE} px or more")
    f = float(tumour_fraction)
    if not 0.0 <= f <= 1.0:
        raise IkdmilError(f"tumour_fraction must be between 0 and 1, got {tumour_fraction}")
    S = size

    mask = _tumour_mask(rng, S, f)
    has_normal = bool((~mask).any())
    has_tumour = bool(mask.any())

    H, E, white, fib_angle, low, chrom = _stroma(rng, S)
    Hn, En = _normal_tissue(rng, S, mask, H, E, white, fib_angle, chrom) if has_normal else (H.copy(), E.copy())
    if has_tumour:
        Ht, Et = _tumour_tissue(rng, S, mask, H, E, chrom)
        H, E = np.where(mask, Ht, Hn), np.where(mask, Et, En)
    else:
        H, E = Hn, En
    return _optics(rng, H, E, low), mask


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


def _write_pair(img_path: Path, image: np.ndarray, mask_path: Path, mask: np.ndarray) -> None:
    # Images are written atomically like write_png does, but with light zlib compression: the sensor
    # noise makes them nearly incompressible anyway (~10% larger files) and it halves the encode time.
    with atomic_path(img_path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=1)
    write_png(mask_path, mask)


def _checked_params(n, seed, size, val_fraction, test_fraction, pos_fraction) -> dict:
    """The generator parameters as written to synth.json, after checking each (one-line errors)."""
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
        raise IkdmilError(f"synthetic image size {size} px is too small; use {MIN_SIZE} px or more")
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
    return {"generator": "ikdmil.prepare.synth", "version": GENERATOR_VERSION, "seed": seed, "n": n, "size": size,
            "val_fraction": val_fraction, "test_fraction": test_fraction, "pos_fraction": pos_fraction}


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
    ``np.random.default_rng([seed, i])``, so the output is deterministic by seed and does not depend
    on the order of generation. Each split gets at least two images and at least one of each class;
    positives get tumour fractions from small foci (~4%) to whole patches (100%), handed out in turn
    within each split. Also writes out/synth.json with the generator parameters; the manifest is
    written last. `out` must be new, empty, or hold this very dataset (same parameters, so rewriting it
    changes nothing); anything else is refused, so two datasets are never mixed.

    Example:
        >>> make_synthetic_dataset("data/synth", n=240, seed=0, size=256)
        PosixPath('data/synth/manifest.csv')
    """
    params = _checked_params(n, seed, size, val_fraction, test_fraction, pos_fraction)
    n, seed, size = params["n"], params["seed"], params["size"]
    plan = _split_plan(n, params["val_fraction"], params["test_fraction"], params["pos_fraction"])
    out = Path(out)
    _check_target(out, params)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "synth.json", json.dumps(params, indent=2) + "\n")
        samples = _write_images(out, plan, seed, size, progress)
        # the manifest goes last: when it exists, the dataset is complete
        return write_manifest(samples, out / MANIFEST_NAME)
    except OSError as exc:
        raise IkdmilError(f"{out}: cannot write the synthetic dataset ({exc}); choose a writable folder") from None


def _check_target(out: Path, params: dict) -> None:
    """Write only into a new or empty folder, or over the same synthetic dataset (same parameters:
    the files come out identical). Anything else would overwrite same-named files of another dataset
    and leave its other files unlisted."""
    if out.exists() and not out.is_dir():
        raise IkdmilError(f"{out}: is a file, not a folder; choose a new folder for the synthetic dataset")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        previous = json.loads((out / "synth.json").read_text())
    except (OSError, ValueError):
        previous = None
    if previous != params:
        what = "another synthetic dataset" if isinstance(previous, dict) else "files that are not a synthetic dataset"
        raise IkdmilError(
            f"{out}: folder holds {what}; choose a new or empty folder (synth never mixes two datasets in one)"
        )


def _write_images(out: Path, plan: list[tuple[str, int]], seed: int, size: int, progress: bool) -> list[Sample]:
    n = len(plan)
    width = max(5, len(str(n - 1)))
    pos_seen = {s: 0 for s in SPLITS}
    samples: list[Sample] = []
    # Images are drawn here, in order; PNG encoding (zlib releases the GIL) runs on a helper thread
    # so it overlaps with drawing the next image. The output does not depend on the timing.
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ikdmil-synth-png") as pool:
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
            pending.append(pool.submit(_write_pair, img_path, image, mask_path, mask))
            while len(pending) > 4:  # bounded memory; also surfaces write errors early
                pending.popleft().result()
            samples.append(Sample(img_path, label, mask_path, split, SYNTH_MPP))
        while pending:
            pending.popleft().result()
    return samples

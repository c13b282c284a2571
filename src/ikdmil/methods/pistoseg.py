"""PistoSeg (Fang et al., AAAI 2023, "Weakly-supervised semantic segmentation for histopathology images
based on dataset synthesis and feature consistency constraint").

PistoSeg replaces CAM pseudo-supervision by *synthesised* supervision: images whose masks are known
because they are assembled from pieces of known class.

Phases:
1. `cam`, `pseudo`: the shared CAM stage (`ikdmil.methods.cam`): normalised CAMs of every training
   and validation image.
2. `mosaic`: the shared `SegNet` (the "preliminary model") trained for `seg_epochs` on mosaics made
   on the fly by `make_mosaic`: a `mosaic_grid` x `mosaic_grid` grid whose every cell is a crop of a
   random negative training image (mask 0) or of a random positive one (mask 1), so every pixel's
   mask is exactly the class of the image it came from. Loss: per-pixel BCE on the mosaics plus
   `consistency_scale` x a feature-consistency term on a batch of *real* training images: the
   decoder features of an image and of its augmented view (a random flip / rotation and a colour
   jitter) must agree once the view's geometric op is applied to the image's features
   (`feature_consistency`: mean of 1 - cosine similarity per location; the un-augmented branch is the
   target, without gradient). The real images are where the model will be used and the mosaics
   are not quite like them (seams, mixed contexts): the term ties the two domains together.
3. `refine`: the pseudo-masks of the real images, refined with that network: the mean of each
   image's CAM and the mosaic network's map, thresholded (threshold chosen on validation like every
   CAM threshold; negatives' pseudo-masks are empty).
4. `segnet`: a second `SegNet` trained on the refined pseudo-masks with per-pixel BCE for
   `seg_epochs` (best epoch on validation -> `segnet.safetensors`, the row of the table). The mosaic
   network is kept as `mosaic.safetensors` (also a model file `evaluate` and `predict` accept).

Where we differ from the paper, and why:
- What a positive crop is: PistoSeg mosaics crops of *single-category* images (tissue types of
  WSSS4LUAD / BCSS-WSSS, where such images exist). Here a positive image holds tumour and other
  tissue, so a crop of it is not all tumour; we take each positive cell's crop where the image's CAM
  is highest (the best of 4 random locations by mean CAM), so that the mask 1 is as true as the
  weak labels allow. Negative crops are exact.
- PistoSeg's consistency is attention-weighted and its refinement module is a separate network;
  ours is the plain (unweighted) feature consistency and a refinement by averaging the mosaic
  network's map with the CAM, then the short retraining of step 4.
- Its networks are DeepLabV3+ / ResNet-38 from ImageNet weights we cannot have offline; ours is
  the shared `SegNet` on the run's registered backbone (local ImageNet weights by default).

Cost: a mosaic step runs three batches (mosaics, real images, their views) through the network, so
the `mosaic` phase costs about three segmentation phases; `consistency_scale 0` drops the two real
ones. Under torchrun every rank draws the same mosaics (one seeded generator, as the augmentation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ikdmil.config import RunConfig
from ikdmil.device import autocast, to_device
from ikdmil.engine.loop import BatchMeta, Step, dihedral
from ikdmil.losses import bce_loss
from ikdmil.methods.cam import CamRun
from ikdmil.methods.registry import register_method

POSITIVE_CANDIDATES = 4  # random crop locations tried per positive cell; the one with the highest mean CAM wins


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, high, (1,), generator=generator)) if high > 1 else 0


def cell_edges(size: int, grid: int) -> list[int]:
    """Pixel boundaries of `grid` cells along a side of `size` (cells differ by at most one pixel)."""
    return [round(i * size / grid) for i in range(grid + 1)]


def make_mosaic(neg_images, pos_images, grid: int, size: int, generator: torch.Generator,
                pos_maps=None, candidates: int = POSITIVE_CANDIDATES):
    """One synthetic training image with its exact mask.

    Args:
        neg_images, pos_images: sequences of uint8 (H,W,3) images (H, W >= the cell size) without and
            with tumour; either may be empty when the other is not.
        grid: cells per side; size: the mosaic's side in pixels.
        generator: every random choice (class, source image, crop location) is drawn from it.
        pos_maps: optional (H,W) maps aligned with `pos_images` (their CAMs): a positive cell takes,
            of `candidates` random crop locations, the one with the highest mean map.

    Returns:
        (image uint8 (size,size,3), mask bool (size,size), layout): `layout` lists per cell
        `(row0, row1, col0, col1, label, source index, crop row, crop col)`. The mask is exactly
        `label` on each cell: 1 where the pixels come from a positive image, 0 from a negative one.
    """
    if not len(neg_images) and not len(pos_images):
        raise ValueError("make_mosaic needs at least one negative or positive image")
    edges = cell_edges(size, grid)
    image = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size), bool)
    layout = []
    for r in range(grid):
        for c in range(grid):
            r0, r1, c0, c1 = edges[r], edges[r + 1], edges[c], edges[c + 1]
            h, w = r1 - r0, c1 - c0
            if not len(pos_images):
                label = 0
            elif not len(neg_images):
                label = 1
            else:
                label = int(torch.rand((), generator=generator) < 0.5)
            pool = pos_images if label else neg_images
            src = _randint(len(pool), generator)
            img = np.asarray(pool[src])
            H, W = img.shape[:2]
            if H < h or W < w:
                raise ValueError(f"source image {src} is {W}x{H} px, smaller than a {w}x{h} cell")
            tries = candidates if (label and pos_maps is not None) else 1
            best = None
            for _ in range(tries):
                y, x = _randint(H - h + 1, generator), _randint(W - w + 1, generator)
                score = float(np.asarray(pos_maps[src])[y:y + h, x:x + w].mean()) if tries > 1 else 0.0
                if best is None or score > best[0]:
                    best = (score, y, x)
            _, y, x = best
            image[r0:r1, c0:c1] = img[y:y + h, x:x + w]
            mask[r0:r1, c0:c1] = bool(label)
            layout.append((r0, r1, c0, c1, label, src, y, x))
    return image, mask, layout


def make_mosaic_batch(neg_images, pos_images, n: int, grid: int, size: int, generator: torch.Generator,
                      pos_maps=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` mosaics as (uint8 (n,3,S,S) images, float32 (n,1,S,S) masks) CPU tensors."""
    images, masks = [], []
    for _ in range(n):
        img, mask, _ = make_mosaic(neg_images, pos_images, grid, size, generator, pos_maps)
        images.append(torch.from_numpy(img))
        masks.append(torch.from_numpy(mask))
    return torch.stack(images).permute(0, 3, 1, 2), torch.stack(masks)[:, None].float()


def colour_jitter(x: torch.Tensor, generator: torch.Generator, strength: float = 0.1) -> torch.Tensor:
    """Per image: contrast and brightness in [1 - s, 1 + s], per-channel gain in [1 - s/2, 1 + s/2]
    (a mild stain variation) of float images in [0,1], clamped to [0,1]."""
    b = x.shape[0]

    def draw(*shape, s):
        return (1 + s * (2 * torch.rand(shape, generator=generator) - 1)).to(x.device, x.dtype)

    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    y = (x - mean) * draw(b, 1, 1, 1, s=strength) + mean
    return (y * draw(b, 1, 1, 1, s=strength) * draw(b, 3, 1, 1, s=strength / 2)).clamp(0, 1)


def feature_consistency(reference: torch.Tensor, view: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """Mean over locations of 1 - cos(dihedral(reference, ops), view): features (B,C,h,w) of images and of
    their views under dihedral `ops`; the reference branch gives no gradient."""
    target = dihedral(reference.detach().float(), ops)
    return (1.0 - F.cosine_similarity(target, view.float(), dim=1, eps=1e-6)).mean()


class PistoSegRun(CamRun):
    method = "pistoseg"
    phases = ("cam", "pseudo", "mosaic", "refine", "segnet")

    def build(self) -> None:
        self.build_classifier()
        self.nets["mosaic"] = self.new_segnet(1)
        self.nets["segnet"] = self.new_segnet(2)
        self.generators["mosaic"] = torch.Generator().manual_seed(self.cfg.seed + 104729)

    def phase_pseudo(self) -> None:
        self.maps["cam_train"] = self.cam_maps(self.train_arrays).half()
        self.maps["cam_val"] = self.cam_maps(self.val_arrays).half()

    def mosaic_step(self, view, opt: torch.optim.Optimizer) -> Step:
        cfg, device, gen = self.cfg, self.device, self.generators["mosaic"]
        labels = np.asarray(self.train_arrays.labels)
        arrays, size = self.train_arrays, cfg.input_size
        pos_idx, neg_idx = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)

        def part(a, i):  # the image's part of the canvas (at least a mosaic's size: cells fit)
            h, w = arrays.sizes[i]
            return a[:max(h, size), :max(w, size)]

        pos = [part(arrays.images[i], i) for i in pos_idx]
        neg = [part(arrays.images[i], i) for i in neg_idx]
        cams = self.maps["cam_train"].float().numpy()
        pos_maps = [part(cams[i], i) for i in pos_idx]
        scale = cfg.consistency_scale

        def step(x: torch.Tensor, y: torch.Tensor, meta: BatchMeta) -> dict[str, torch.Tensor]:
            view.train()
            b = x.shape[0]
            mosaics, masks = make_mosaic_batch(neg, pos, b, cfg.mosaic_grid, cfg.input_size, gen, pos_maps)
            parts = [to_device(mosaics, device).float() / 255.0]
            if scale > 0:
                real = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
                ops = to_device(torch.randint(0, 8, (b,), generator=gen), device)
                parts += [real, colour_jitter(dihedral(real, ops), gen)]
            inp = torch.cat(parts).contiguous(memory_format=torch.channels_last)
            with autocast(device, cfg.amp):
                out, feats = view(inp, with_features=True)
            seg = bce_loss(out.fused[:b], to_device(masks, device))
            losses = {"seg": seg.detach()}
            loss = seg
            if scale > 0:
                cons = feature_consistency(feats[b:2 * b], feats[2 * b:], ops)
                loss = seg + scale * cons
                losses["consistency"] = cons.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss.detach(), **losses}

        return step

    def phase_mosaic(self) -> None:
        self.train_segnet("mosaic", "mosaic", self.cfg.seg_epochs, self.mosaic_step, "pistoseg mosaic")

    def phase_refine(self) -> None:
        net = self.nets["mosaic"]
        train = (self.maps["cam_train"].float() + self.predict_maps(net, self.train_arrays)) / 2
        val = (self.maps["cam_val"].float() + self.predict_maps(net, self.val_arrays)) / 2
        self.make_pseudo_masks(train, val, "CAM refined by the mosaic network (PistoSeg)")



@register_method("pistoseg", summary="mosaics of negative/positive crops with exact masks + feature consistency "
                                     "-> refined pseudo-masks -> segmentation network")
def train_pistoseg(cfg: RunConfig, *, resume: bool = False, progress: bool = True, **options) -> dict:
    """PistoSeg into `cfg.out`: writes mosaic.safetensors, segnet.safetensors, model.safetensors, results.json."""
    return PistoSegRun(cfg, resume, progress).run()

"""Per-slide sanity warnings: results a user should look at before trusting them.

Each warning is one line (it names the slide and what to check), goes into the slide's
``summary.json`` under ``"warnings"`` and is logged once, at WARNING level, when the slide is segmented:

- **tumour everywhere**: more than `TUMOUR_FRACTION_WARN` (90 %) of the tissue is called tumour. A
  model fed the wrong resolution, a stain it never saw, or a threshold that is too low does this;
- **stain far from training**: the slide's mean stain on its thumbnail's tissue (stain-normalised
  first with --stain-normalise: the stain the model sees) is more than
  `ikdmil.stain.STAIN_Z_WARN` training spreads from the training images' (see `ikdmil.stain` for the
  space, the distance and the threshold). Model files written before the statistics existed have
  none: the check is skipped (debug log) and ``"stain"`` in the summary says so.
"""

from __future__ import annotations

import logging

import numpy as np

from ikdmil.stain import CHANNELS, STAIN_Z_WARN, StainStats, slide_stats, stain_distance

logger = logging.getLogger(__name__)

TUMOUR_FRACTION_WARN = 0.9


def tumour_fraction_warning(name: str, fraction: float, model_mpp: float, mpp_source: str) -> str | None:
    """The warning for a slide whose tissue is mostly called tumour, or None."""
    if fraction <= TUMOUR_FRACTION_WARN:
        return None
    return (f"{name}: {100 * fraction:.0f} % of the tissue is called tumour (more than "
            f"{100 * TUMOUR_FRACTION_WARN:.0f} %); check the model's resolution ({model_mpp:g} µm/px, "
            f"{mpp_source}; --model-mpp), the stain and --threshold before trusting the mask")


def stain_check(name: str, thumb: np.ndarray, tissue: np.ndarray, reference: StainStats | None,
                normalised: bool = False) -> tuple[dict, str | None]:
    """(the summary's "stain" entry, a warning or None) for a slide thumbnail and its tissue mask;
    `normalised`: the thumbnail is already stain-normalised (the warning then suggests no normaliser)."""
    if reference is None:
        logger.debug("%s: the model file has no stain statistics (written by an older ikdmil); stain check skipped",
                     name)
        return {"checked": False, "reason": "the model file has no stain statistics"}, None
    stats = slide_stats(thumb, tissue)
    if stats is None:
        return {"checked": False, "reason": "no stained tissue on the thumbnail"}, None
    z = stain_distance(stats, reference)
    entry = {"checked": True, "channels": list(CHANNELS), "mean": [round(float(v), 6) for v in stats.mean],
             "training_mean": [round(float(v), 6) for v in reference.mean], "z": [round(v, 3) for v in z],
             "threshold": STAIN_Z_WARN}
    worst = int(np.argmax(z))
    if z[worst] <= STAIN_Z_WARN:
        return entry, None
    direction = "stronger" if stats.mean[worst] > reference.mean[worst] else "weaker"
    return entry, (f"{name}: stain far from the training data's ({CHANNELS[worst]} {direction}: mean "
                   f"{stats.mean[worst]:.4f} vs {reference.mean[worst]:.4f}, {z[worst]:.1f} training spreads, more "
                   f"than {STAIN_Z_WARN:g}); the model may be unreliable here: check the staining and scan, "
                   + ("" if normalised else "try --stain-normalise macenko (README: Stain robustness), ")
                   + "or use a model trained on slides stained like it")


def slide_warnings(summary: dict, thumb: np.ndarray, tissue: np.ndarray, reference: StainStats | None,
                   raw: np.ndarray | None = None) -> None:
    """Add "warnings" (and "stain") to a slide's summary and log each warning once.

    `thumb` is what the model saw (the stain-normalised thumbnail with --stain-normalise); `raw`, the
    thumbnail before normalisation, adds its distance as "z_before_normalisation" and warns nothing.
    """
    name = summary["slide"]
    warnings = []
    tumour = tumour_fraction_warning(name, summary["tumour_fraction_of_tissue"], summary["model_mpp"],
                                     summary["model_mpp_source"])
    if tumour:
        warnings.append(tumour)
    summary["stain"], stain = stain_check(name, thumb, tissue, reference, normalised=raw is not None)
    if raw is not None and summary["stain"]["checked"]:
        before, _ = stain_check(name, raw, tissue, reference)
        summary["stain"]["measured_on"] = "the stain-normalised thumbnail"
        if before["checked"]:
            summary["stain"]["z_before_normalisation"] = before["z"]
    if stain:
        warnings.append(stain)
    for w in warnings:
        logger.warning(w)
    summary["warnings"] = warnings

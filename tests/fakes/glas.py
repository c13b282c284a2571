"""Tiny fake GlaS folders in the official layout and in the compact (jpg/png/index.csv) layout.

Both generators return one dict per image: name, split (train/testA/testB), grade, patient, and label
(the instance-label array for official, the 0/255 array for shared), so tests can check the output.
Patients are laid out so that train has patients with only malignant, only benign and mixed images
(a validation split by patient with both classes is always possible), and test shares some patients
with train, as the real GlaS does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _records(n_train: int, n_testA: int, n_testB: int) -> list[dict]:
    records = []
    for i in range(1, n_train + 1):
        patient = (i - 1) // 2 % 4 + 1  # pairs of images per patient, four patients
        if patient == 1:
            grade = "malignant"
        elif patient == 2:
            grade = "benign"
        else:
            grade = "malignant" if i % 2 else "benign"
        records.append({"name": f"train_{i}", "split": "train", "grade": grade, "patient": patient})
    for split, n in (("testA", n_testA), ("testB", n_testB)):
        for j in range(1, n + 1):
            patient = 3 + j % 4  # 3..6: some seen in train, some only in test
            grade = "malignant" if j % 2 else "benign"
            records.append({"name": f"{split}_{j}", "split": split, "grade": grade, "patient": patient})
    return records


def _draw(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and instance labels (0 background, 1..k glands) of size (width, height)."""
    width, height = size
    image = rng.integers(150, 230, size=(height, width, 3), dtype=np.uint8)
    labels = np.zeros((height, width), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for k in range(1, int(rng.integers(1, 4)) + 1):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.1, 0.25) * height, rng.uniform(0.1, 0.25) * width
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        labels[inside] = k
        image[inside] = (120, 60, 140)
    return image, labels


def make_fake_glas_official(
    root, n_train: int = 8, n_testA: int = 4, n_testB: int = 2, size: tuple[int, int] = (40, 32), seed: int = 0
) -> list[dict]:
    """train_N.bmp + train_N_anno.bmp (instance labels), testA_N / testB_N, and Grade.csv, in `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = _records(n_train, n_testA, n_testB)
    lines = ["name, patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"]
    for r in records:
        image, labels = _draw(rng, size)
        Image.fromarray(image).save(root / f"{r['name']}.bmp")
        Image.fromarray(labels).save(root / f"{r['name']}_anno.bmp")
        r["label"] = labels
        detail = "moderately differentiated" if r["grade"] == "malignant" else "healthy"
        lines.append(f"{r['name']}, {r['patient']}, {r['grade']}, {detail}")  # values with leading spaces
    (root / "Grade.csv").write_text("\n".join(lines) + "\n")
    return records


def make_fake_glas_shared(
    root, n_train: int = 8, n_testA: int = 4, n_testB: int = 2, size: tuple[int, int] = (40, 32), seed: int = 0
) -> list[dict]:
    """images/NAME.jpg, labels/NAME.png (0/255) and index.csv, in `root`."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = _records(n_train, n_testA, n_testB)
    lines = ["name,split,grade_glas,grade_sirinukunwattana,patient_id,width,height,gland_fraction"]
    for r in records:
        image, labels = _draw(rng, size)
        mask = np.where(labels > 0, 255, 0).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{r['name']}.jpg", quality=90)
        Image.fromarray(mask).save(root / "labels" / f"{r['name']}.png")
        r["label"] = mask
        detail = "moderately differentiated" if r["grade"] == "malignant" else "healthy"
        lines.append(
            f"{r['name']},{r['split']},{r['grade']},{detail},{r['patient']},{size[0]},{size[1]},"
            f"{(mask > 0).mean():.4f}"
        )
    (root / "index.csv").write_text("\n".join(lines) + "\n")
    return records

"""Generate small ImageFolder trees with Pillow (tests of the imagefolder dataset and streaming)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: one base colour per class: a small net separates them in a few steps
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40))


def make_image_folder(root: Path, classes: int = 3, train: int = 20, val: int = 6, seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*``: class colour + noise, varied sizes
    (18–30 px, non-square); in each class one JPEG and one grayscale PNG among the PNGs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"class_{chr(97 + c)}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = (int(v) for v in rng.integers(18, 31, size=2))
                x = np.array(COLOURS[c % len(COLOURS)], dtype=np.float64) + rng.normal(0, 30, (h, w, 3))
                img = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
                if i == 1:
                    img.save(d / f"{i:04d}.jpg", quality=90)
                elif i == 2:
                    img.convert("L").save(d / f"{i:04d}.png")
                else:
                    img.save(d / f"{i:04d}.png")
    (root / "train" / "notes.txt").write_text("not a class folder")
    return root

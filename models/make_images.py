"""Writes ``models/images/``: eight small JPEG photos (64x64, centre square crops of scikit-image's bundled
colour photos, resized with Pillow), the "folder of images" of the README's "From raw files to a validated model"
walk-through. Deterministic (same Pillow → same bytes); committed, so a fresh clone needs neither this script
nor scikit-image (a test extra). Regenerate with ``python models/make_images.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent / "images"
SIZE = 64
#: scikit-image's bundled colour photos (no download): name -> the file in skimage/data
PHOTOS = {
    "astronaut": "astronaut.png", "cat": "chelsea.png", "coffee": "coffee.png", "galaxies": "hubble_deep_field.jpg",
    "tissue": "ihc.png", "motorcycle": "motorcycle_left.png", "retina": "retina.jpg", "rocket": "rocket.jpg",
}


def main() -> None:
    import skimage.data  # a test extra: only this generator needs it

    src = Path(skimage.data.__file__).parent
    OUT.mkdir(exist_ok=True)
    for name, file in PHOTOS.items():
        img = np.asarray(Image.open(src / file).convert("RGB"))
        h, w = img.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        crop = Image.fromarray(img[top:top + s, left:left + s]).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
        crop.save(OUT / f"{name}.jpg", quality=90, optimize=True)
    print(f"wrote {len(PHOTOS)} images to {OUT} ({sum(p.stat().st_size for p in OUT.glob('*.jpg'))} bytes)")


if __name__ == "__main__":
    main()

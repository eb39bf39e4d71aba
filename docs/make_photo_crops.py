"""A folder of small photographs made offline from the colour photographs that scikit-image and scikit-learn ship,
for trying image completion on "your own images" without a download:

    pip install scikit-image
    python docs/make_photo_crops.py OUT_DIR --count 4000 --size 64

Each file is a random square crop (side 1/8 to 1/3 of the photo's shorter side, random position, random
horizontal flip) resized to size x size. The datamodule splits the folder into train/val/test at random, so
test crops come from the same nine photographs as training crops (other places in them, sometimes
overlapping): a fair ground for comparing methods side by side, not a test of generalisation to new scenes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina")


def photos() -> dict[str, np.ndarray]:
    """name -> HxWx3 uint8, from the packages' bundled data (no network)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    found = {}
    for name in SKIMAGE_PHOTOS:
        try:
            found[name] = np.asarray(getattr(skimage.data, name)())[..., :3]
        except Exception as err:                                # a photo this scikit-image version lacks
            print(f"skipping skimage.data.{name}: {type(err).__name__}: {err}")
    for name, image in zip(("china", "flower"), load_sample_images().images):
        found[name] = image
    return found


def crops(image: np.ndarray, count: int, size: int, rng: np.random.Generator) -> list[Image.Image]:
    h, w = image.shape[:2]
    out = []
    for _ in range(count):
        side = int(rng.integers(min(h, w) // 8, min(h, w) // 3 + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(image[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
        out.append(crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    images = photos()
    args.out.mkdir(parents=True, exist_ok=True)
    per_photo = -(-args.count // len(images))
    written = 0
    for name in sorted(images):
        for i, crop in enumerate(crops(images[name], min(per_photo, args.count - written), args.size, rng)):
            crop.save(args.out / f"{name}_{i:05d}.png")
            written += 1
    print(f"{args.out}: {written} crops of {args.size} px from {', '.join(sorted(images))}")

if __name__ == "__main__":
    main()

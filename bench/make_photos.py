#!/usr/bin/env python3
"""A catalogue of photo-sized JPEGs made from a catalogue of drawings, for benchmarks.

    make_photos.py MANIFEST OUT_DIR [--limit N] [--split train|test] [--min-mp 2] [--max-mp 8] [--seed 0]

Every item of MANIFEST (optionally one split, the first N after a seeded shuffle) becomes a
natural-looking photo: a 2-8 megapixel canvas (4:3 or 3:2, either orientation) with a smooth
lit background (low-frequency noise in colour, a light gradient, fine grain), the item's
drawing enlarged to 35-70 % of the shorter side at a random place, a soft shadow under it,
sensor noise over everything, saved as a baseline JPEG (quality 85-92, 4:2:0 chroma) as a
camera would. OUT_DIR/manifest.jsonl carries every field of the original item (labels, split,
role) with `image` pointing at the photo, so `hiercon index` and `hiercon eval` take it as they
take the original. Deterministic: the photo of an item depends only on --seed and its id.

Needs numpy and Pillow (.cache/venv has both after `make pyenv`).
"""
import argparse
import hashlib
import json
import os
import random
import sys

import numpy as np
from PIL import Image, ImageFilter


def item_rng(seed, item_id):
    h = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def smooth_noise(rng, h, w, cells, channels):
    """Low-frequency noise: a coarse random grid enlarged with bicubic interpolation."""
    grid = rng.random((cells, cells, channels)).astype(np.float32)
    out = np.empty((h, w, channels), np.float32)
    for c in range(channels):
        im = Image.fromarray(grid[:, :, c], mode="F").resize((w, h), Image.BICUBIC)
        out[:, :, c] = np.asarray(im)
    return out


def photo(drawing, rng, min_mp, max_mp):
    mp = rng.uniform(min_mp, max_mp) * 1e6
    aspect = rng.choice([4 / 3, 3 / 2])
    long_side = int(round((mp * aspect) ** 0.5))
    short_side = int(round(long_side / aspect))
    w, h = (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)

    # Background: a base colour, soft coloured blotches, a light falloff, fine texture.
    base = rng.uniform(60, 220, 3).astype(np.float32)
    blotch = smooth_noise(rng, h, w, int(rng.integers(3, 7)), 3) - 0.5
    texture = smooth_noise(rng, h, w, int(rng.integers(40, 120)), 1) - 0.5
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
    falloff = 1.0 - 0.35 * (((xx - cx) / w) ** 2 + ((yy - cy) / h) ** 2)
    bg = (base + 70 * blotch + 18 * texture) * falloff[:, :, None]
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")

    # The product: the drawing enlarged, a blurred shadow under it.
    side = int(min(w, h) * rng.uniform(0.35, 0.7))
    obj = drawing.convert("RGBA").resize((side, side), Image.LANCZOS)
    x0 = int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    alpha = obj.getchannel("A")
    shadow = Image.new("L", (w, h), 0)
    off = max(2, side // 30)
    shadow.paste(alpha, (min(x0 + off, w - side), min(y0 + off, h - side)))
    shadow = shadow.filter(ImageFilter.GaussianBlur(max(2, side // 40)))
    dark = Image.new("RGB", (w, h), (20, 20, 20))
    canvas = Image.composite(dark, canvas, shadow.point(lambda v: int(v * 0.45)))
    canvas.paste(obj, (x0, y0), alpha)

    # The camera: a touch of blur, sensor noise.
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
    arr = np.asarray(canvas).astype(np.float32)
    arr += rng.normal(0, rng.uniform(1.5, 4.0), arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), int(rng.integers(85, 93))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("manifest")
    ap.add_argument("out_dir")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--split", choices=["train", "test"])
    ap.add_argument("--min-mp", type=float, default=2.0)
    ap.add_argument("--max-mp", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not 0 < args.min_mp <= args.max_mp:
        sys.exit("--min-mp must be positive and at most --max-mp")

    src_dir = os.path.dirname(os.path.abspath(args.manifest))
    with open(args.manifest) as f:
        items = [json.loads(line) for line in f if line.strip()]
    if args.split:
        items = [it for it in items if it.get("split") == args.split]
    if args.limit is not None:
        random.Random(args.seed).shuffle(items)
        items = sorted(items[: args.limit], key=lambda it: it["id"])
    os.makedirs(os.path.join(args.out_dir, "images"), exist_ok=True)

    out_manifest = os.path.join(args.out_dir, "manifest.jsonl")
    with open(out_manifest + ".tmp", "w") as out:
        for n, it in enumerate(items, 1):
            rel = os.path.join("images", f"{it['id']}.jpg")
            path = os.path.join(args.out_dir, rel)
            if not os.path.exists(path):
                img, quality = photo(Image.open(os.path.join(src_dir, it["image"])), item_rng(args.seed, it["id"]),
                                     args.min_mp, args.max_mp)
                img.save(path + ".tmp", "JPEG", quality=quality, subsampling=2)
                os.replace(path + ".tmp", path)
            out.write(json.dumps({**it, "image": rel}) + "\n")
            if n % 50 == 0 or n == len(items):
                print(f"{n}/{len(items)} photos", file=sys.stderr, flush=True)
    os.replace(out_manifest + ".tmp", out_manifest)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The nightly re-index into Milvus: a change applied to the standby collection against a new
collection, through `hiercon index --milvus` itself, at several sizes of change.

    bench/milvus_nightly.py --hiercon target/release/hiercon --address 127.0.0.1:PORT \
        --work DIR --n 100000 --out-json F.json --out-md F.md

A catalogue of N generated 16 x 16 PNGs (seeded noise; `--test-encoder 128`, so embedding costs
next to nothing and what is measured is the writing: Milvus insert, index, load, verification) is
indexed twice with --write full (so a standby exists). Then for each fraction of images redrawn,
one run with --write delta and one with --write full, alternating, each fed from the live
collection's cached embeddings. The standby is one generation behind the live one, so a delta
applies the last two runs' changes: the table reports the rows each run really deleted and
inserted, and its wall time and phases as `hiercon index` printed them.
"""

import argparse
import json
import re
import subprocess
import sys
import time
import zlib
import struct
from pathlib import Path

import numpy as np

SIDE = 16


def png(pixels: np.ndarray) -> bytes:
    """A minimal RGB PNG (8-bit, no filter)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b""))


def draw(i: int, seed: int) -> bytes:
    rng = np.random.default_rng([i, seed])
    base = rng.integers(0, 256, size=3)
    noise = rng.integers(-40, 40, size=(SIDE, SIDE, 3))
    return png(np.clip(base + noise, 0, 255).astype(np.uint8))


def make(work: Path, n: int) -> Path:
    img = work / "img"
    img.mkdir(parents=True, exist_ok=True)
    manifest = work / "manifest.jsonl"
    # Always drawn afresh: the runs below redraw images with fixed seeds, so a catalogue left by an
    # earlier run would already hold those drawings and nothing would change.
    with manifest.open("w") as f:
        for i in range(n):
            (img / f"{i}.png").write_bytes(draw(i, 0))
            item = {"id": f"i{i}", "image": f"img/{i}.png", "category": f"c{i % 40}/s{i % 7}",
                    "product": f"p{i // 4}", "variation": f"v{i % 2}", "view": "w0", "split": "train"}
            f.write(json.dumps(item) + "\n")
    return manifest


def redraw(work: Path, n: int, k: int, seed: int) -> None:
    """Redraws k images spread over the catalogue."""
    step = max(1, n // max(k, 1))
    for j in range(k):
        i = (j * step + seed) % n
        (work / "img" / f"{i}.png").write_bytes(draw(i, seed))


def index(args, manifest: Path, write: str) -> dict:
    cmd = [args.hiercon, "index", "--milvus", args.address, "--collection", "nightly", "--test-encoder", "128",
           "--manifest", str(manifest), "--write", write, "--standby-grace", "0", "--milvus-timeout", "600"]
    t = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
    out = p.stdout
    took = re.search(r"^took (.*)$", out, re.M).group(1)
    phases = {m.group(1): float(m.group(2)) for m in re.finditer(r"([a-z+]+) ([0-9.]+) s", took)}
    m = re.search(r"deleted (\d+), inserted (\d+) rows", out)
    path = re.search(r"^path: (.*)$", out, re.M).group(1)
    return {"write": write, "wall_s": round(wall, 2), "phases_s": phases,
            "deleted": int(m.group(1)) if m else 0, "inserted": int(m.group(2)) if m else 0, "path": path}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hiercon", required=True)
    ap.add_argument("--address", required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--fractions", default="0.001,0.01,0.05,0.1,0.2")
    ap.add_argument("--out-json", type=Path, required=True)
    ap.add_argument("--out-md", type=Path, required=True)
    args = ap.parse_args()
    n = args.n
    t = time.monotonic()
    manifest = make(args.work, n)
    print(f"catalogue of {n} images in {time.monotonic() - t:.0f} s", file=sys.stderr)
    runs = []
    seed = 1
    for write in ["full", "full"]:
        redraw(args.work, n, 1, seed)
        seed += 1
        runs.append({"fraction": 0.0, **index(args, manifest, write)})
        print(runs[-1], file=sys.stderr)
    for frac in [float(x) for x in args.fractions.split(",")]:
        for write in ["delta", "full"]:
            redraw(args.work, n, max(1, int(frac * n)), seed)
            seed += 1
            runs.append({"fraction": frac, **index(args, manifest, write)})
            print(runs[-1], file=sys.stderr)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    import os
    res = {"n": n, "dim": 128, "cpu": f"{cpu}, {os.cpu_count()} cores", "runs": runs}
    args.out_json.write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# Nightly re-index into Milvus: the change applied to the standby against a new collection ({n:,} rows x 128)",
             "",
             f"CPU: {res['cpu']}; one run; Milvus 2.3.5 standalone on loopback; `hiercon index --milvus --test-encoder 128` "
             "(embedding costs next to nothing: the figures are the writing). Images redrawn per run as listed; "
             "a delta applies the rows that differ between the standby (one generation behind) and the new catalogue.",
             "",
             "| images redrawn | --write | rows deleted + inserted | share of rows | wall s | phases (s) |",
             "|---:|---|---:|---:|---:|---|"]
    for r in runs:
        changed = r["deleted"] + r["inserted"]
        ph = ", ".join(f"{k} {v:.1f}" for k, v in r["phases_s"].items())
        rows = f"{changed:,}" if r["write"] == "delta" else f"all {r['inserted']:,} inserted"
        share = f"{100 * changed / n:.1f} %" if r["write"] == "delta" else "—"
        lines.append(f"| {r['fraction'] * 100:g} % | {r['write']} | {rows} | {share} | {r['wall_s']:.1f} | {ph} |")
    args.out_md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

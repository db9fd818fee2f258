"""The anchor for `hiercon model quantize`: what a user would reach for, ONNX Runtime's own Python
quantiser (`onnxruntime.quantization.quantize_static`: QDQ, per-channel int8 weights, uint8
activations, MinMax calibration, after `quant_pre_process`), on the same calibration images as a
hiercon int8 model (the ids its `.json` records), decoded and resized by PIL.

    python bench/ort_quantize.py quantize FLOAT.onnx HIERCON_INT8.json MANIFEST OUT.onnx
    python bench/ort_quantize.py time MODEL.onnx [MODEL.onnx ...] --size 128 --batch 64 --rounds 5
    python bench/ort_quantize.py embed MODEL.onnx MANIFEST --size 128 [--no-draft]

`time` runs each model with 2 intra-op threads on a fixed random batch, interleaved over rounds,
and prints one JSON line per model: images/s (median of the rounds).

`embed` is the end-to-end anchor of a catalogue embedding: every image of MANIFEST read and
decoded by PIL (JPEGs in draft mode: PIL's DCT-scaled decoding to at least the model's size,
unless --no-draft), the shorter side resized to --size (bilinear), centre-cropped, normalised
with ImageNet's mean and std, 64 at a time through the model (2 intra-op threads); one JSON
line: images, seconds, images/s.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort


def load_images(manifest, ids, size, mean, std):
    from PIL import Image

    root = os.path.dirname(manifest)
    by_id = {}
    with open(manifest) as f:
        for line in f:
            item = json.loads(line)
            by_id[item["id"]] = item
    out = []
    for i in ids:
        img = Image.open(os.path.join(root, by_id[i]["image"]))
        if img.mode in ("RGBA", "LA", "P"):
            img = img.convert("RGBA")
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, img)
        img = img.convert("RGB").resize((size, size), Image.BILINEAR)
        x = np.asarray(img, dtype=np.float32) / 255.0
        x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
        out.append(x.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def quantize(args):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    meta = json.load(open(args.hiercon_json))
    ids = meta["quantization"]["calibration"]["ids"]
    size = meta["input"]["size"]
    x = load_images(args.manifest, ids, size, meta["input"]["mean"], meta["input"]["std"])
    name = meta["input"]["name"]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: x[i : i + 16]} for i in range(0, len(x), 16)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as d:
        pre = os.path.join(d, "pre.onnx")
        quant_pre_process(args.float_model, pre)
        quantize_static(
            pre,
            args.out,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    print(json.dumps({"wrote": args.out, "calibration_images": len(ids)}))


def timing(args):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sessions = [ort.InferenceSession(m, opts, providers=["CPUExecutionProvider"]) for m in args.models]
    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    rates = [[] for _ in sessions]
    for s in sessions:
        s.run(None, {s.get_inputs()[0].name: x})
    for _ in range(args.rounds):
        for i, s in enumerate(sessions):
            t = time.perf_counter()
            n = 0
            while time.perf_counter() - t < args.seconds:
                s.run(None, {s.get_inputs()[0].name: x})
                n += args.batch
            rates[i].append(n / (time.perf_counter() - t))
    for m, r in zip(args.models, rates):
        print(json.dumps({"model": m, "batch": args.batch, "images_per_s": statistics.median(r), "rounds": r}))


def embed(args):
    from PIL import Image

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    root = os.path.dirname(os.path.abspath(args.manifest))
    with open(args.manifest) as f:
        paths = [os.path.join(root, json.loads(line)["image"]) for line in f if line.strip()]
    size = args.size
    t = time.perf_counter()
    batch, n = [], 0
    for i, path in enumerate(paths):
        img = Image.open(path)
        if img.format == "JPEG" and not args.no_draft:
            img.draft("RGB", (size, size))
        if img.mode in ("RGBA", "LA", "P"):
            img = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
        img = img.convert("RGB")
        w, h = img.size
        rw, rh = (size, size * h // w) if w <= h else (size * w // h, size)
        img = img.resize((rw, rh), Image.BILINEAR)
        left, top = round((rw - size) / 2), round((rh - size) / 2)
        img = img.crop((left, top, left + size, top + size))
        x = (np.asarray(img, dtype=np.float32) / 255.0 - mean) / std
        batch.append(x.transpose(2, 0, 1))
        if len(batch) == 64 or i == len(paths) - 1:
            session.run(None, {name: np.stack(batch)})
            n += len(batch)
            batch = []
    seconds = time.perf_counter() - t
    print(json.dumps({"model": args.model, "manifest": args.manifest, "draft": not args.no_draft,
                      "images": n, "seconds": seconds, "images_per_s": n / seconds}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("float_model")
    q.add_argument("hiercon_json")
    q.add_argument("manifest")
    q.add_argument("out")
    t = sub.add_parser("time")
    t.add_argument("models", nargs="+")
    t.add_argument("--size", type=int, default=128)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--rounds", type=int, default=5)
    t.add_argument("--seconds", type=float, default=2.0)
    t.add_argument("--threads", type=int, default=2)
    e = sub.add_parser("embed")
    e.add_argument("model")
    e.add_argument("manifest")
    e.add_argument("--size", type=int, default=128)
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--no-draft", action="store_true")
    args = p.parse_args()
    {"quantize": quantize, "time": timing, "embed": embed}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Reference for hiercon's ONNX import: one value of an ONNX model, computed by Python's onnxruntime.

Given a model, the name of any value in its graph (an inner one, e.g. the input of the classifier,
or a graph output) and a batch of hiercon-style images (float32 [N, 3, S, S], RGB, already
normalised), this script feeds the images the way the model wants them (``--nhwc``: transposed to
[N, S, S, 3]; ``--bgr``: channels reversed), asks onnxruntime for the value by adding it to the
graph's outputs with the ``onnx`` package, and saves it as float32 ``.npy``. It shares no code with
hiercon: ``onnx`` reads the file and onnxruntime runs it.

Usage:
  onnx_value_ref.py --model M.onnx --value NAME --images IN.npy --out OUT.npy [--nhwc] [--bgr]
"""
import argparse
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--value", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--nhwc", action="store_true")
    p.add_argument("--bgr", action="store_true")
    a = p.parse_args()
    m = onnx.load(a.model)
    if a.value not in {o.name for o in m.graph.output}:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(a.value))
    x = np.load(a.images).astype(np.float32)
    if a.bgr:
        x = x[:, ::-1, :, :]
    if a.nhwc:
        x = x.transpose(0, 2, 3, 1)
    inits = {i.name for i in m.graph.initializer}
    feeds = [i.name for i in m.graph.input if i.name not in inits]
    if len(feeds) != 1:
        print(f"expected one image input, found {feeds}", file=sys.stderr)
        return 2
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run([a.value], {feeds[0]: np.ascontiguousarray(x)})
    np.save(a.out, np.asarray(y, dtype=np.float32))
    return 0


if __name__ == "__main__":
    sys.exit(main())

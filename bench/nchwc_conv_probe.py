"""Evidence for a planning decision, not part of the build: ORT's CPU library runs its blocked
NCHWc convolution (domain `com.microsoft.nchwc`) with weights that are *graph values*, reordered
in-graph from OIHW to OIHW16i16o by Reshape + Transpose, 1.35-1.7x faster than the standard Conv
it must otherwise use for a training step (ORT's NCHWc transformer only rewrites convolutions
whose weights are constants). The step graph keeps to standard ops (DESIGN §1), so hiercon does
not use this. Block size 16 assumes AVX-512 (8 on AVX2).

    .cache/venv/bin/python bench/nchwc_conv_probe.py
"""

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BLOCK = 16


def model(nodes, inits, n, c, m, hw, domains):
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c, hw, hw]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [m, c, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in domains], ir_version=9)


def timed(sess, feeds, reps=20):
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[reps // 2]


def compare(n, c, m, hw, stride):
    conv = dict(pads=[1, 1, 1, 1], strides=[stride, stride])
    plain = model([helper.make_node("Conv", ["x", "w"], ["y"], **conv)], [], n, c, m, hw, [("", 17)])
    nchwc = model([
        helper.make_node("ReorderInput", ["x"], ["xb"], domain="com.microsoft.nchwc"),
        helper.make_node("Reshape", ["w", "s6"], ["w6"]),
        helper.make_node("Transpose", ["w6"], ["w6t"], perm=[0, 2, 4, 5, 3, 1]),
        helper.make_node("Reshape", ["w6t", "s4"], ["wb"]),
        helper.make_node("Conv", ["xb", "wb"], ["yb"], domain="com.microsoft.nchwc", kernel_shape=[3, 3], **conv),
        helper.make_node("ReorderOutput", ["yb"], ["y"], domain="com.microsoft.nchwc", channels=m),
    ], [numpy_helper.from_array(np.array([m // BLOCK, BLOCK, c // BLOCK, BLOCK, 3, 3], np.int64), "s6"),
        numpy_helper.from_array(np.array([m, c, 3, 3], np.int64), "s4")],
        n, c, m, hw, [("", 17), ("com.microsoft.nchwc", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sp = ort.InferenceSession(plain.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sn = ort.InferenceSession(nchwc.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal([n, c, hw, hw]).astype(np.float32),
             "w": rng.standard_normal([m, c, 3, 3]).astype(np.float32)}
    err = np.abs(sn.run(None, feeds)[0] - sp.run(None, feeds)[0]).max()
    print(f"{c}->{m} at {hw}x{hw} stride {stride}: standard Conv {timed(sp, feeds):.2f} ms, "
          f"NCHWc with reorders {timed(sn, feeds):.2f} ms, max |diff| {err:.1e}")


if __name__ == "__main__":
    for shape in [(64, 32, 32, 32, 1), (64, 64, 64, 16, 1), (64, 128, 128, 8, 1), (64, 32, 64, 32, 2), (64, 64, 128, 16, 2)]:
        compare(*shape)

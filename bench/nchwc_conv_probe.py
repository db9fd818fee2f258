"""Evidence for a planning decision, not part of the build: ORT's CPU library runs its blocked
NCHWc convolution (domain `com.microsoft.nchwc`) with weights that are *graph values*, reordered
in-graph from OIHW to OIHW16i16o by Reshape + Transpose, 1.35-1.7x faster than the standard Conv
it must otherwise use for a training step (ORT's NCHWc transformer only rewrites convolutions
whose weights are constants). The step graph keeps to standard ops (DESIGN §1), so hiercon does
not use this. Block size 16 assumes AVX-512 (8 on AVX2).

    .cache/venv/bin/python bench/nchwc_conv_probe.py
    HIERCON_BENCH_DUMP=/tmp/step cargo bench --bench train_step -- --test
    .cache/venv/bin/python bench/nchwc_conv_probe.py --step /tmp/step/train_step.onnx

With `--step`, every eligible Conv of a dumped training step (weights a graph value, one group,
channels a multiple of the block) is rewritten the same way, both graphs take the same step on
the same inputs (largest relative output difference printed) and are timed alternating step by
step.
"""

import sys
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


def rewrite_step(path):
    """The step graph at `path` with its eligible Convs on NCHWc kernels."""
    import onnx
    m = onnx.load(path)
    inferred = onnx.shape_inference.infer_shapes(m)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}
    consts = {i.name for i in m.graph.initializer}
    nodes, k = [], 0
    for n in m.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        ws = shapes.get(n.input[1]) if n.op_type == "Conv" else None
        if (ws and len(n.input) == 2 and n.input[1] not in consts and a.get("group", 1) == 1
                and list(a.get("dilations", [1, 1])) == [1, 1] and ws[0] % BLOCK == 0 and ws[1] % BLOCK == 0):
            k += 1
            mo, c, kh, kw = ws
            m.graph.initializer.extend([
                numpy_helper.from_array(np.array([mo // BLOCK, BLOCK, c // BLOCK, BLOCK, kh, kw], np.int64), f"nchwc.s6.{k}"),
                numpy_helper.from_array(np.array(ws, np.int64), f"nchwc.s4.{k}")])
            nodes += [
                helper.make_node("ReorderInput", [n.input[0]], [f"nchwc.x.{k}"], domain="com.microsoft.nchwc"),
                helper.make_node("Reshape", [n.input[1], f"nchwc.s6.{k}"], [f"nchwc.w6.{k}"]),
                helper.make_node("Transpose", [f"nchwc.w6.{k}"], [f"nchwc.w6t.{k}"], perm=[0, 2, 4, 5, 3, 1]),
                helper.make_node("Reshape", [f"nchwc.w6t.{k}", f"nchwc.s4.{k}"], [f"nchwc.w.{k}"]),
                helper.make_node("Conv", [f"nchwc.x.{k}", f"nchwc.w.{k}"], [f"nchwc.y.{k}"], domain="com.microsoft.nchwc",
                                 kernel_shape=[kh, kw], pads=a.get("pads", [0] * 4), strides=a.get("strides", [1, 1])),
                helper.make_node("ReorderOutput", [f"nchwc.y.{k}"], [n.output[0]], domain="com.microsoft.nchwc",
                                 channels=mo)]
        else:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.opset_import.append(helper.make_opsetid("com.microsoft.nchwc", 1))
    return m, k


def compare_step(path, rounds=30):
    import onnx
    rewritten, k = rewrite_step(path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sessions = [ort.InferenceSession(onnx.load(path).SerializeToString(), so, providers=["CPUExecutionProvider"]),
                ort.InferenceSession(rewritten.SerializeToString(), so, providers=["CPUExecutionProvider"])]
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sessions[0].get_inputs():
        if i.type == "tensor(float)":
            feeds[i.name] = (rng.standard_normal(i.shape) * 0.05).astype(np.float32)
        elif i.type == "tensor(int64)":
            feeds[i.name] = rng.integers(0, 4, i.shape).astype(np.int64)
    for name in feeds:
        if name.endswith("running_var"):
            feeds[name] = np.abs(feeds[name]) + 1
    n = feeds["labels"].shape[0]
    feeds["labels"] = np.stack([np.arange(n) % 3, np.arange(n) % 6, np.arange(n) // 2, np.arange(n), 100 + np.arange(n)], 1)
    feeds["lr"] = np.array(0.01, np.float32)
    outs = [dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds))) for s in sessions]
    worst = max(np.abs(outs[0][k2] - outs[1][k2]).max() / (1e-6 + np.abs(outs[0][k2]).max()) for k2 in outs[0])
    times = [[], []]
    for _ in range(rounds):
        for j, s in enumerate(sessions):
            t = time.perf_counter()
            s.run(None, feeds)
            times[j].append(1000 * (time.perf_counter() - t))
    med = [sorted(t)[rounds // 2] for t in times]
    print(f"{k} Convs rewritten; largest relative output difference {worst:.1e}; "
          f"step {med[0]:.1f} ms standard, {med[1]:.1f} ms NCHWc (medians of {rounds}, alternating)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--step"]:
        compare_step(sys.argv[2])
        sys.exit()
    for shape in [(64, 32, 32, 32, 1), (64, 64, 64, 16, 1), (64, 128, 128, 8, 1), (64, 32, 64, 32, 2), (64, 64, 128, 16, 2)]:
        compare(*shape)

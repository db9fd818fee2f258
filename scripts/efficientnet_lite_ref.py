#!/usr/bin/env python3
"""Independent reference forward pass for EfficientNet-Lite (lite0/1/2), for tests.

This script exists so that a Rust test can check hiercon's own EfficientNet-Lite
graph against a second, independently written implementation (to ~1e-4).  It
shares no code with hiercon and never imports torch: it

  1. reads a PyTorch *legacy* (non-zip) ``.pth`` checkpoint with its own
     ``pickle.Unpickler`` subclass, rebuilding every tensor from its storage
     with the recorded storage_offset / size / stride (the strides in these
     files are not contiguous);
  2. builds an ONNX graph (opset 17, float32, symbolic batch ``N``) of the
     network: stem conv3x3/s2 -> BN -> ReLU6, MBConv blocks (optional 1x1
     expand -> BN -> ReLU6, depthwise kxk -> BN -> ReLU6, 1x1 project -> BN,
     residual when stride 1 and in == out), head conv1x1 -> BN -> ReLU6,
     global average pool (``features`` [N,1280]) and the fc layer
     (``logits`` [N,1000]).  BN eps is 1e-3; padding is TensorFlow static
     "SAME" (extra pixel at the bottom/right), given as asymmetric Conv pads;
  3. runs it with onnxruntime on the CPU.

The input ``images`` is float32 [N,3,S,S], already normalised (for these
TF-Lite-trained weights: (pixel - 127) / 128); normalisation is not in the graph.

Usage:
  efficientnet_lite_ref.py --pth P --size S --images IN.npy --out OUT.npz [--onnx M.onnx]
  efficientnet_lite_ref.py --pth P --dump-keys   # "name<TAB>[d0,d1,..]<TAB>dtype" per tensor
  efficientnet_lite_ref.py --pth P --stats       # tensor and parameter counts

Errors exit with status 2 and a message on stderr.
"""

import argparse
import collections
import io
import math
import pickle
import struct
import sys

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
BN_EPS = 1e-3
STAGE_STRIDES = [1, 2, 2, 2, 1, 2, 1]  # EfficientNet-B0 stage table
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
}


class RefError(Exception):
    """A problem worth a clear message and a non-zero exit."""


# --------------------------------------------------------------------------
# Legacy .pth reader
# --------------------------------------------------------------------------

class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class _Storage:
    def __init__(self, key, stype, numel):
        self.key, self.stype, self.numel = key, stype, numel
        self.data = None  # filled in once the raw bytes have been read


class _TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, *rest):
    if not isinstance(storage, _Storage):
        raise RefError("_rebuild_tensor_v2 got a non-storage argument")
    return _TensorRef(storage, storage_offset, size, stride)


class _LegacyUnpickler(pickle.Unpickler):
    """Allows only the handful of globals a legacy state dict needs."""

    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise RefError(f"unexpected class in pickle: {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise RefError(f"unexpected persistent id: {pid!r}")
        _, stype, key, _location, numel, view_metadata = pid
        if not isinstance(stype, _StorageType):
            raise RefError(f"persistent id with unknown storage type: {stype!r}")
        if view_metadata is not None:
            raise RefError("storage views (view_metadata) are not supported")
        st = self.storages.get(key)
        if st is None:
            st = self.storages[key] = _Storage(key, stype, int(numel))
        return st


def load_legacy_pth(path):
    """Returns an ordered dict name -> contiguous numpy array."""
    try:
        with open(path, "rb") as fh:
            buf = fh.read()
    except OSError as e:
        raise RefError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if buf[:4] == b"PK\x03\x04":
        raise RefError(f"{path}: is a zip-format checkpoint; only the legacy format is supported")
    f = io.BytesIO(buf)
    storages = {}

    def next_pickle(what):
        try:
            return _LegacyUnpickler(f, storages).load()
        except RefError:
            raise
        except Exception as e:  # EOFError, UnpicklingError, ...
            raise RefError(f"{path}: cannot unpickle {what}: {type(e).__name__}: {e}") from None

    magic = next_pickle("magic number")
    if magic != LEGACY_MAGIC:
        raise RefError(f"{path}: not a legacy PyTorch file (magic {magic!r}); "
                       "zip-format checkpoints are not supported")
    proto = next_pickle("protocol version")
    if proto != LEGACY_PROTOCOL:
        raise RefError(f"{path}: unsupported protocol version {proto!r}")
    sys_info = next_pickle("sys info")
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise RefError(f"{path}: only little-endian checkpoints are supported")
    state = next_pickle("state dict")
    if not isinstance(state, dict):
        raise RefError(f"{path}: state dict is a {type(state).__name__}, not a dict")
    keys = next_pickle("storage key list")
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise RefError(f"{path}: storage key list does not match the storages used")

    pos = f.tell()
    for key in keys:
        st = storages[key]
        if pos + 8 > len(buf):
            raise RefError(f"{path}: truncated before storage {key}")
        (count,) = struct.unpack_from("<q", buf, pos)
        pos += 8
        nbytes = count * st.stype.dtype.itemsize
        if count != st.numel:
            raise RefError(f"{path}: storage {key}: element count {count}, expected {st.numel}")
        if pos + nbytes > len(buf):
            raise RefError(f"{path}: truncated in storage {key} "
                           f"(needs {nbytes} bytes, {len(buf) - pos} left)")
        st.data = np.frombuffer(buf, dtype=st.stype.dtype, count=count, offset=pos)
        pos += nbytes
    if pos != len(buf):
        raise RefError(f"{path}: {len(buf) - pos} trailing bytes after the storages")

    out = collections.OrderedDict()
    for name, t in state.items():
        if not isinstance(t, _TensorRef):
            raise RefError(f"{path}: entry {name!r} is not a tensor")
        data = t.storage.data
        if len(t.size) != len(t.stride) or any(s < 0 for s in t.stride):
            raise RefError(f"{path}: tensor {name}: bad size/stride {t.size}/{t.stride}")
        last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
        if 0 in t.size:
            last = t.offset - 1
        if t.offset < 0 or last >= data.size:
            raise RefError(f"{path}: tensor {name} reaches past its storage")
        view = np.lib.stride_tricks.as_strided(
            data[t.offset:], shape=t.size,
            strides=[s * data.itemsize for s in t.stride], writeable=False)
        out[name] = np.array(view, dtype=data.dtype.newbyteorder("="), order="C")
    return out


# --------------------------------------------------------------------------
# ONNX graph
# --------------------------------------------------------------------------

def same_pads(size, k, stride):
    """TF static SAME padding for one spatial dim: (out, pad_begin, pad_end)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + k - size, 0)
    return out, total // 2, total - total // 2


class GraphBuilder:
    def __init__(self, weights):
        from onnx import helper, numpy_helper
        self.h, self.nh = helper, numpy_helper
        self.w = weights
        self.used = set()
        self.nodes, self.inits = [], []
        self.n = 0

    def weight(self, name):
        if name not in self.w:
            raise RefError(f"checkpoint lacks tensor {name}")
        self.used.add(name)
        arr = self.w[name].astype(np.float32)
        self.inits.append(self.nh.from_array(arr, name))
        return name, arr

    def node(self, op, inputs, **attrs):
        self.n += 1
        out = f"t{self.n}_{op}"
        self.nodes.append(self.h.make_node(op, inputs, [out], name=f"n{self.n}", **attrs))
        return out

    def conv(self, x, hw, wname, stride=1, groups=1):
        wn, w = self.weight(wname)
        k = w.shape[2]
        if w.shape[2] != w.shape[3]:
            raise RefError(f"{wname}: non-square kernel {w.shape}")
        oh, pb, pe = same_pads(hw, k, stride)
        y = self.node("Conv", [x, wn], kernel_shape=[k, k], strides=[stride, stride],
                      pads=[pb, pb, pe, pe], group=groups, dilations=[1, 1])
        return y, oh, w.shape[0]

    def bn(self, x, prefix):
        ins = [self.weight(f"{prefix}.{p}")[0]
               for p in ("weight", "bias", "running_mean", "running_var")]
        self.used.add(f"{prefix}.num_batches_tracked")
        return self.node("BatchNormalization", [x] + ins, epsilon=BN_EPS)

    def relu6(self, x):
        if "relu6_min" not in self.used:
            self.used.add("relu6_min")
            self.inits.append(self.nh.from_array(np.array(0.0, np.float32), "relu6_min"))
            self.inits.append(self.nh.from_array(np.array(6.0, np.float32), "relu6_max"))
        return self.node("Clip", [x, "relu6_min", "relu6_max"])


def block_indices(weights):
    idx = set()
    for name in weights:
        parts = name.split(".")
        if parts[0] == "_blocks":
            idx.add(int(parts[1]))
    if idx != set(range(len(idx))):
        raise RefError("block indices are not 0..n-1")
    return sorted(idx)


def block_strides(weights):
    """Stride per block: new stage whenever the output channel count changes."""
    prev = weights["_conv_stem.weight"].shape[0]
    stage, strides = -1, []
    for b in block_indices(weights):
        cout = weights[f"_blocks.{b}._project_conv.weight"].shape[0]
        if cout != prev:
            stage += 1
            strides.append(STAGE_STRIDES[stage] if stage < len(STAGE_STRIDES) else None)
        else:
            strides.append(1)
        prev = cout
    if stage + 1 != len(STAGE_STRIDES):
        raise RefError(f"found {stage + 1} stages, expected {len(STAGE_STRIDES)}")
    return strides


def build_model(weights, size):
    import onnx
    from onnx import TensorProto, helper
    g = GraphBuilder(weights)
    x, hw, c = g.conv("images", size, "_conv_stem.weight", stride=2)
    x = g.relu6(g.bn(x, "_bn0"))
    for b, stride in zip(block_indices(weights), block_strides(weights)):
        p = f"_blocks.{b}"
        if any(k.startswith(p + "._se_") for k in weights):
            raise RefError(f"{p} has squeeze-excite weights: not an EfficientNet-Lite")
        inp, cin = x, c
        if f"{p}._expand_conv.weight" in weights:
            x, hw, c = g.conv(x, hw, f"{p}._expand_conv.weight")
            x = g.relu6(g.bn(x, f"{p}._bn0"))
        x, hw, c = g.conv(x, hw, f"{p}._depthwise_conv.weight", stride=stride, groups=c)
        x = g.relu6(g.bn(x, f"{p}._bn1"))
        x, hw, c = g.conv(x, hw, f"{p}._project_conv.weight")
        x = g.bn(x, f"{p}._bn2")
        if stride == 1 and cin == c:
            x = g.node("Add", [x, inp])
    x, hw, c = g.conv(x, hw, "_conv_head.weight")
    x = g.relu6(g.bn(x, "_bn1"))
    feats = g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1)
    g.nodes.append(helper.make_node("Identity", [feats], ["features"], name="features"))
    fcw, fcb = g.weight("_fc.weight")[0], g.weight("_fc.bias")[0]
    g.nodes.append(helper.make_node("Gemm", ["features", fcw, fcb], ["logits"],
                                    name="fc", transB=1))
    leftover = sorted(set(weights) - g.used)
    if leftover:
        raise RefError(f"checkpoint tensors not used by the graph: {leftover[:5]}")
    n_cls = weights["_fc.weight"].shape[0]
    graph = helper.make_graph(
        g.nodes, "efficientnet_lite_ref",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", c]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_cls])],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="efficientnet_lite_ref")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run_model(model, images):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    # No graph rewrites (e.g. Conv+BN fusion): keep the reference literal.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    features, logits = sess.run(["features", "logits"], {"images": images})
    return features, logits


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pth", required=True, help="legacy-format EfficientNet-Lite .pth")
    ap.add_argument("--size", type=int, help="input height = width S")
    ap.add_argument("--images", help="float32 [N,3,S,S] .npy, already normalised")
    ap.add_argument("--out", help="output .npz with features and logits")
    ap.add_argument("--onnx", help="also save the built ONNX model here")
    ap.add_argument("--dump-keys", action="store_true", help="print name, shape, dtype")
    ap.add_argument("--stats", action="store_true", help="print tensor/parameter counts")
    a = ap.parse_args(argv)

    weights = load_legacy_pth(a.pth)
    if a.dump_keys:
        for name, t in weights.items():
            print(f"{name}\t[{','.join(str(d) for d in t.shape)}]\t{t.dtype}")
    if a.stats:
        params = [t for n, t in weights.items() if not n.endswith("num_batches_tracked")]
        print(f"tensors {len(weights)}")
        print(f"parameters {sum(t.size for t in params)}")
        trainable = [t for n, t in weights.items()
                     if not n.endswith(("num_batches_tracked", "running_mean", "running_var"))]
        print(f"trainable_parameters {sum(t.size for t in trainable)}")
    if a.dump_keys or a.stats:
        if a.images is None and a.onnx is None:
            return 0

    if (a.images is None) != (a.out is None):
        raise RefError("--images and --out must be given together")
    if a.images is None and a.onnx is None:
        raise RefError("nothing to do: give --images/--out, --onnx, --dump-keys or --stats")
    if a.size is None or a.size < 1:
        raise RefError("--size S (a positive integer) is required to build the graph")
    model = build_model(weights, a.size)
    if a.onnx:
        with open(a.onnx, "wb") as fh:
            fh.write(model.SerializeToString())
    if a.images is None:
        return 0
    try:
        images = np.load(a.images, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise RefError(f"cannot load images {a.images}: {e}") from None
    if images.dtype != np.float32 or images.ndim != 4 or images.shape[1:] != (3, a.size, a.size):
        raise RefError(f"images must be float32 [N,3,{a.size},{a.size}], "
                       f"got {images.dtype} {list(images.shape)}")
    features, logits = run_model(model, np.ascontiguousarray(images))
    np.savez(a.out, features=features, logits=logits)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RefError as e:
        print(f"efficientnet_lite_ref: error: {e}", file=sys.stderr)
        sys.exit(2)

//! The ONNX protobuf messages (`ModelProto`, `GraphProto`, ...), generated at build time from the
//! vendored `proto/onnx.proto` (ONNX 1.23, Apache-2.0).
#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/onnx.rs"));

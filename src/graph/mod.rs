//! Training compiler: graph IR, autodiff to standard ONNX ops, optimizers, ONNX writer (issue 3).

pub mod proto;

//! Training compiler: graph IR, autodiff to standard ONNX ops, optimizers, ONNX writer (issue 3).
//!
//! A [`Graph`] holds typed values with static shapes ([`Value`] is a small `Copy` handle) and
//! standard ONNX nodes (opset [`onnx::OPSET`] = 18, default domain only, so stock ONNX Runtime
//! runs every graph). Builders read like the math and check shapes as nodes are added; a bad
//! operand is an [`Error::GraphShape`](crate::Error::GraphShape) naming the op and both shapes.
//!
//! - inputs: [`Graph::input`] (data fed each run), [`Graph::param`] (trainable, with initial
//!   value; listed by [`Graph::params`]), [`Graph::buffer`] (e.g. BatchNorm running stats);
//! - constants: [`Graph::scalar`], [`Graph::const_i64`], [`Graph::constant_f32`], [`Graph::zeros`];
//! - math: `add sub mul div max min` (numpy broadcasting), `neg relu sigmoid exp log sqrt
//!   reciprocal pow_scalar`, `reduce_sum/mean/max(x, axes, keepdims)`, `sum_all`, `where_`,
//!   `equal greater less and not cast`;
//! - shape: `reshape flatten transpose concat split slice gather unsqueeze squeeze expand pad
//!   scatter_elements`;
//! - nn ([`nn`]): `matmul gemm linear conv conv_transpose max_pool max_pool_with_indices
//!   global_avg_pool batch_norm_train batch_norm_infer`;
//! - outputs: [`Graph::output`] names a result; [`Graph::feed_back`] pairs a stateful input with
//!   its new value (output `"<name>.next"`), listed by [`Graph::feedback`].
//!
//! [`Graph::to_onnx`] writes the model (only what the outputs need); [`Runner`] runs it in an
//! ONNX Runtime session with named [`Tensor`]s.
//!
//! ```
//! use hiercon::graph::{Conv2d, DType, Graph, Runner, Tensor};
//! # fn main() -> hiercon::Result<()> {
//! let mut g = Graph::new();
//! let x = g.input("x", DType::F32, &[2, 3, 8, 8])?;
//! let w = g.param("conv.w", &[4, 3, 3, 3], vec![0.01; 108])?;
//! let y = g.conv(x, w, None, Conv2d { stride: 2, pad: 1, ..Default::default() })?;
//! let y = g.relu(y)?;
//! let pooled = g.global_avg_pool(y)?;             // [2, 4, 1, 1]
//! let feat = g.flatten(pooled, 1)?;               // [2, 4]
//! g.output("feat", feat)?;
//!
//! let mut run = Runner::cpu(&g)?;                  // parameters default to their initial values
//! let xs = Tensor::f32(&[2, 3, 8, 8], vec![1.0; 384])?;
//! let out = run.run(&[("x", &xs)])?;
//! assert_eq!(out.f32("feat")?.shape(), &[2, 4]);
//! # Ok(()) }
//! ```

pub mod autodiff;
pub mod ir;
pub mod nn;
pub mod onnx;
pub mod optim;
pub mod ops;
pub mod proto;
pub mod run;

pub use autodiff::{ConvGradChoice, GradOptions, GradReport, grad, grad_with};
pub use ir::{Attr, ConvWeightGrad, DType, Graph, Input, InputKind, Node, Source, Tensor, Value, ValueInfo};
pub use nn::{BatchNorm, BatchNormOut, Conv2d, ConvTranspose2d, Gemm, Pool2d};
pub use optim::{AdamW, Optimizer, OptimizerStep, Sgd, TrainStep, train_step};
pub use run::{Outputs, Runner};

#[cfg(test)]
pub(crate) mod testutil;

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
//! - math ([`ops`]): `add sub mul div max min` (numpy broadcasting), `add_scalar mul_scalar`,
//!   `neg relu sigmoid exp log sqrt reciprocal pow_scalar identity`, `reduce_sum/mean/max/
//!   sum_square(x, axes, keepdims)`, `sum_all mean_all sum`, `where_`, `equal greater less and
//!   not cast`;
//! - shape ([`ops`]): `reshape reshape_to flatten transpose concat split slice gather unsqueeze
//!   squeeze expand pad scatter_elements`;
//! - nn ([`nn`]): `matmul gemm linear conv conv_transpose max_pool max_pool_with_indices
//!   global_avg_pool batch_norm_train batch_norm_train_fused batch_norm_infer channel_affine`;
//! - outputs: [`Graph::output`] names a result; [`Graph::feed_back`] pairs a stateful input with
//!   its new value (output `"<name>.next"`), listed by [`Graph::feedback`].
//!
//! [`grad`] appends the backward pass (reverse mode, one rule per op, standard ops only; see
//! [`autodiff`]); [`grad_with`] also takes [`GradOptions`] and returns a [`GradReport`] of the
//! per-layer conv weight-gradient lowering ([`ConvWeightGrad`]). [`optim`] appends SGD or AdamW
//! (learning rate and step count are inputs `lr` / `step`); [`train_step`] does gradients plus
//! optimizer for every parameter. [`Graph::to_onnx`] writes the model (only what the outputs
//! need); [`Runner`] runs it in an ONNX Runtime session with named [`Tensor`]s, and [`Carried`]
//! moves the `.next` outputs back to the inputs between steps. The one exception to "default
//! domain only" is opt-in: [`WriteOptions::nchwc_block`] writes dense convolutions on ORT's
//! CPU-only NCHWc ops ([`nchwc`]).
//!
//! ```
//! use hiercon::graph::*;
//! # fn main() -> hiercon::Result<()> {
//! let mut g = Graph::new();
//! let x = g.input("images", DType::F32, &[8, 3, 16, 16])?;
//! let w = g.param("conv.w", &[16, 3, 3, 3], (0..432).map(|i| ((i % 7) as f32 - 3.0) * 0.05).collect())?;
//! let (gamma, beta) = (g.param("bn.gamma", &[16], vec![1.0; 16])?, g.param("bn.beta", &[16], vec![0.0; 16])?);
//! let (rm, rv) = (g.buffer("bn.mean", &[16], vec![0.0; 16])?, g.buffer("bn.var", &[16], vec![1.0; 16])?);
//! let y = g.conv(x, w, None, Conv2d { stride: 2, pad: 1, ..Default::default() })?;   // [8, 16, 8, 8]
//! let bn = g.batch_norm_train(y, gamma, beta, rm, rv, BatchNorm::default())?;
//! g.feed_back(rm, bn.running_mean)?;
//! g.feed_back(rv, bn.running_var)?;
//! let h = g.relu(bn.y)?;
//! let pooled = g.global_avg_pool(h)?;
//! let feat = g.flatten(pooled, 1)?;                                               // [8, 16]
//! let head = g.param("head.w", &[4, 16], vec![0.1; 64])?;
//! let z = g.linear(feat, head, None)?;
//! let sq = g.mul(z, z)?;
//! let loss = g.mean_all(sq)?;
//! let step = train_step(&mut g, loss, &Optimizer::Sgd(Sgd::default()), &GradOptions::default())?;
//! g.output("loss", loss)?;
//! assert_eq!(step.report.convs[0].lowering, ConvWeightGrad::Im2col);
//!
//! let mut run = Runner::cpu(&g)?;
//! let mut state = Carried::new(&g)?;                  // parameters, BN stats, momentum
//! let images = Tensor::f32(&[8, 3, 16, 16], (0..6144).map(|i| (i % 13) as f32 / 13.0).collect())?;
//! let lr = Tensor::F32(ndarray::arr0(0.1f32).into_dyn());
//! let mut losses = Vec::new();
//! for _ in 0..3 {
//!     let mut feeds = vec![("images", &images), ("lr", &lr)];
//!     feeds.extend(state.feeds());
//!     let out = run.run(&feeds)?;
//!     losses.push(out.f32("loss")?.iter().sum::<f32>());
//!     state.update(&out)?;
//! }
//! assert!(losses[2] < losses[0]);
//! # Ok(()) }
//! ```

pub mod autodiff;
pub mod import;
pub mod ir;
pub mod nchwc;
pub mod nn;
pub mod onnx;
pub mod ops;
pub mod optim;
pub mod proto;
pub mod run;

pub use autodiff::{BatchNormLowering, ConvGradChoice, DepthwiseLowering, GradOptions, GradReport, grad, grad_with};
pub use ir::{Attr, ConvWeightGrad, DType, Graph, Input, InputKind, Node, Source, Tensor, Value, ValueInfo};
pub use nn::{
    BatchNorm, BatchNormOut, Conv2d, ConvTranspose2d, DENSE_DEPTHWISE_MAX_PIXELS, Gemm, Pool2d, tf_same_pads,
};
pub use onnx::WriteOptions;
pub use optim::{AdamW, Optimizer, OptimizerStep, Sgd, TrainStep, train_step};
pub use run::{Carried, Outputs, Runner};

#[cfg(test)]
pub(crate) mod testutil;

//! The projection head of the paper: Linear(d, d) → ReLU → Linear(d, embed_dim), then rows
//! divided by their L2 norm.

use super::net::Net;
use crate::Result;
use crate::graph::{Graph, Value};

/// Added under the square root of the L2 normalisation.
pub const L2_EPS: f64 = 1e-12;

/// `x / sqrt(sum(x², axis 1) + eps)` for `x [B, D]`.
pub(crate) fn l2_normalize(g: &mut Graph, x: Value) -> Result<Value> {
    let sq = g.mul(x, x)?;
    let s = g.reduce_sum(sq, &[1], true)?;
    let s = g.add_scalar(s, L2_EPS)?;
    let n = g.sqrt(s)?;
    g.div(x, n)
}

/// `feature [B, d]` → unit-norm embeddings `[B, embed_dim]` (parameters `head.fc1.*`, `head.fc2.*`).
pub(crate) fn head(net: &mut Net, feature: Value, embed_dim: usize) -> Result<Value> {
    let d = net.g.shape(feature)[1];
    let h = net.linear(feature, "head.fc1", d)?;
    let h = net.g.relu(h)?;
    let z = net.linear(h, "head.fc2", embed_dim)?;
    l2_normalize(net.g, z)
}

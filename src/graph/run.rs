//! Runner: compiles a [`Graph`] into an ONNX Runtime session and runs it with named host tensors,
//! checking every feed against the graph's declared inputs.

use std::borrow::Cow;
use std::collections::HashMap;

use ort::session::{Session, SessionInputValue};
use ort::value::TensorRef;

use super::ir::{DType, Graph, Tensor};
use crate::runtime::RuntimeOptions;
use crate::{Error, Result};

struct Slot {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    init: Option<Tensor>,
}

/// An ONNX Runtime session for one graph.
pub struct Runner {
    session: Session,
    inputs: Vec<Slot>,
    outputs: Vec<(String, DType)>,
}

/// Named outputs of one run, in the graph's output order.
#[derive(Debug, Clone)]
pub struct Outputs(pub Vec<(String, Tensor)>);

impl Outputs {
    /// The output called `name`.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::GraphInvalid { reason: format!("no output called `{name}`") })
    }

    /// The f32 output called `name`.
    pub fn f32(&self, name: &str) -> Result<&ndarray::ArrayD<f32>> {
        let t = self.get(name)?;
        t.as_f32().ok_or_else(|| Error::GraphType {
            op: format!("output `{name}`"),
            detail: format!("is {}, not f32", t.dtype()),
        })
    }

    /// The f64 output called `name`.
    pub fn f64(&self, name: &str) -> Result<&ndarray::ArrayD<f64>> {
        let t = self.get(name)?;
        t.as_f64().ok_or_else(|| Error::GraphType {
            op: format!("output `{name}`"),
            detail: format!("is {}, not f64", t.dtype()),
        })
    }

    /// The outputs as a map.
    pub fn into_map(self) -> HashMap<String, Tensor> {
        self.0.into_iter().collect()
    }
}

/// The current values of a graph's fed-back inputs (parameters, buffers, optimizer state),
/// carried from one run's `"<name>.next"` outputs to the next run's inputs.
#[derive(Debug, Clone)]
pub struct Carried {
    /// (input name, output name, current value)
    slots: Vec<(String, String, Tensor)>,
}

impl Carried {
    /// Starts from the initial values of every input listed in [`Graph::feedback`].
    pub fn new(graph: &Graph) -> Result<Carried> {
        let slots = graph
            .feedback()
            .iter()
            .map(|&(i, o)| {
                let init = graph.input_info(i).and_then(|inp| inp.init.clone()).ok_or_else(|| Error::GraphFeed {
                    name: graph.name(i).to_string(),
                    reason: "fed back but has no initial value".into(),
                })?;
                Ok((graph.name(i).to_string(), graph.name(o).to_string(), init))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Carried { slots })
    }

    /// `(input name, value)` pairs to feed.
    pub fn feeds(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.slots.iter().map(|(n, _, t)| (n.as_str(), t))
    }

    /// Takes the new values from a run's outputs.
    pub fn update(&mut self, out: &Outputs) -> Result<()> {
        for (_, o, t) in &mut self.slots {
            *t = out.get(o)?.clone();
        }
        Ok(())
    }

    /// The current value of the input called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.slots.iter().find(|(n, _, _)| n == name).map(|(_, _, t)| t)
    }
}

impl Runner {
    /// Writes `graph` as ONNX and loads it into a session with the given device and threads.
    pub fn new(graph: &Graph, opts: &RuntimeOptions) -> Result<Runner> {
        Runner::with_write_options(graph, opts, super::WriteOptions::default())
    }

    /// [`Runner::new`] with the graph written as `write` asks.
    pub fn with_write_options(graph: &Graph, opts: &RuntimeOptions, write: super::WriteOptions) -> Result<Runner> {
        let bytes = graph.to_onnx_with("hiercon", write)?;
        let session = crate::runtime::init()?.session_from_bytes(opts, &bytes)?;
        let inputs = graph
            .inputs()
            .iter()
            .map(|i| {
                let info = graph.info(i.value);
                Slot { name: info.name.clone(), dtype: info.dtype, shape: info.shape.clone(), init: i.init.clone() }
            })
            .collect();
        let outputs = graph.outputs().iter().map(|&v| (graph.name(v).to_string(), graph.dtype(v))).collect();
        Ok(Runner { session, inputs, outputs })
    }

    /// A CPU session with ONNX Runtime's default thread count.
    pub fn cpu(graph: &Graph) -> Result<Runner> {
        Runner::new(graph, &RuntimeOptions::default())
    }

    /// Runs the graph. Every data input must be fed; parameters, buffers and optimizer state
    /// that are not fed take their initial values. Feeds must match the declared type and shape.
    pub fn run(&mut self, feeds: &[(&str, &Tensor)]) -> Result<Outputs> {
        for (name, _) in feeds {
            if !self.inputs.iter().any(|s| s.name == *name) {
                return Err(Error::GraphFeed { name: name.to_string(), reason: "the graph has no such input".into() });
            }
        }
        let mut chosen: Vec<(&str, &Tensor)> = Vec::with_capacity(self.inputs.len());
        for slot in &self.inputs {
            let t = match feeds.iter().find(|(n, _)| *n == slot.name) {
                Some((_, t)) => *t,
                None => slot.init.as_ref().ok_or_else(|| Error::GraphFeed {
                    name: slot.name.clone(),
                    reason: "not fed, and it has no initial value".into(),
                })?,
            };
            if t.dtype() != slot.dtype || t.shape() != slot.shape.as_slice() {
                return Err(Error::GraphFeed {
                    name: slot.name.clone(),
                    reason: format!("declared {}{:?}, fed {}{:?}", slot.dtype, slot.shape, t.dtype(), t.shape()),
                });
            }
            chosen.push((&slot.name, t));
        }
        // ONNX Runtime reads contiguous buffers: copy the (rare) non-standard-layout feeds first.
        let copies: Vec<Option<Tensor>> = chosen.iter().map(|(_, t)| standard_copy(t)).collect();
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(chosen.len());
        for ((name, t), copy) in chosen.iter().zip(&copies) {
            let t = copy.as_ref().unwrap_or(t);
            let v: SessionInputValue<'_> = match t {
                Tensor::F32(a) => TensorRef::from_array_view(a.view()).map(Into::into),
                Tensor::F64(a) => TensorRef::from_array_view(a.view()).map(Into::into),
                Tensor::I64(a) => TensorRef::from_array_view(a.view()).map(Into::into),
                Tensor::Bool(a) => TensorRef::from_array_view(a.view()).map(Into::into),
            }
            .map_err(|e| Error::ort(format!("wrapping input `{name}`"), e))?;
            values.push((Cow::Borrowed(*name), v));
        }
        let out = self.session.run(values).map_err(|e| Error::ort("running graph", e))?;
        let mut result = Vec::with_capacity(self.outputs.len());
        for (name, dtype) in &self.outputs {
            let v = out
                .get(name.as_str())
                .ok_or_else(|| Error::ort("running graph", format!("output `{name}` missing")))?;
            let ctx = || format!("reading output `{name}`");
            let t = match dtype {
                DType::F32 => Tensor::F32(v.try_extract_array::<f32>().map_err(|e| Error::ort(ctx(), e))?.to_owned()),
                DType::F64 => Tensor::F64(v.try_extract_array::<f64>().map_err(|e| Error::ort(ctx(), e))?.to_owned()),
                DType::I64 => Tensor::I64(v.try_extract_array::<i64>().map_err(|e| Error::ort(ctx(), e))?.to_owned()),
                DType::Bool => {
                    Tensor::Bool(v.try_extract_array::<bool>().map_err(|e| Error::ort(ctx(), e))?.to_owned())
                }
            };
            result.push((name.clone(), t));
        }
        Ok(Outputs(result))
    }
}

fn standard_copy(t: &Tensor) -> Option<Tensor> {
    match t {
        Tensor::F32(a) if !a.is_standard_layout() => Some(Tensor::F32(a.as_standard_layout().into_owned())),
        Tensor::F64(a) if !a.is_standard_layout() => Some(Tensor::F64(a.as_standard_layout().into_owned())),
        Tensor::I64(a) if !a.is_standard_layout() => Some(Tensor::I64(a.as_standard_layout().into_owned())),
        Tensor::Bool(a) if !a.is_standard_layout() => Some(Tensor::Bool(a.as_standard_layout().into_owned())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{ArrayD, Axis, IxDyn};

    use super::*;
    use crate::graph::testutil::{conv_ref, rng, uniform};
    use crate::graph::{BatchNorm, Conv2d};

    fn f64s(t: &Tensor) -> ArrayD<f64> {
        ArrayD::from_shape_vec(t.shape(), t.to_f64_vec()).unwrap()
    }

    fn assert_close(a: &ArrayD<f64>, b: &ArrayD<f64>, tol: f64) {
        assert_eq!(a.shape(), b.shape());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{x} vs {y} (tolerance {tol})");
        }
    }

    #[test]
    fn conv_matches_a_plain_rust_reference() {
        // Stride 2, padding 1, two groups, odd input size; f32 in ORT vs f64 here, tolerance 1e-5.
        let mut r = rng(7);
        let x = uniform(&mut r, DType::F32, &[2, 4, 7, 7]);
        let w = uniform(&mut r, DType::F32, &[6, 2, 3, 3]);
        let mut g = Graph::new();
        let xv = g.input("x", DType::F32, &[2, 4, 7, 7]).unwrap();
        let wv = g.input("w", DType::F32, &[6, 2, 3, 3]).unwrap();
        let y = g.conv(xv, wv, None, Conv2d { stride: 2, pad: 1, groups: 2, ..Default::default() }).unwrap();
        g.output("y", y).unwrap();
        let out = Runner::cpu(&g).unwrap().run(&[("x", &x), ("w", &w)]).unwrap();
        let want = conv_ref(&f64s(&x), &f64s(&w), 2, 1, 1, 2);
        assert_close(&f64s(out.get("y").unwrap()), &want, 1e-5);
    }

    #[test]
    fn matmul_broadcast_and_reductions_match_ndarray() {
        // f64 end to end; tolerance 1e-12.
        let mut r = rng(8);
        let a = uniform(&mut r, DType::F64, &[3, 4]);
        let b = uniform(&mut r, DType::F64, &[4, 5]);
        let c = uniform(&mut r, DType::F64, &[5]);
        let mut g = Graph::new();
        let (av, bv, cv) = (
            g.input("a", DType::F64, &[3, 4]).unwrap(),
            g.input("b", DType::F64, &[4, 5]).unwrap(),
            g.input("c", DType::F64, &[5]).unwrap(),
        );
        let m = g.matmul(av, bv).unwrap();
        let s = g.add(m, cv).unwrap();
        let y = g.relu(s).unwrap();
        let rs = g.reduce_sum(y, &[0], false).unwrap();
        let rmax = g.reduce_max(s, &[1], true).unwrap();
        g.output("y", y).unwrap();
        g.output("rs", rs).unwrap();
        g.output("rmax", rmax).unwrap();
        let out = Runner::cpu(&g).unwrap().run(&[("a", &a), ("b", &b), ("c", &c)]).unwrap();
        let (a, b, c) = (f64s(&a), f64s(&b), f64s(&c));
        let a2 = a.into_dimensionality::<ndarray::Ix2>().unwrap();
        let b2 = b.into_dimensionality::<ndarray::Ix2>().unwrap();
        let s = (a2.dot(&b2) + &c.into_dimensionality::<ndarray::Ix1>().unwrap()).into_dyn();
        let y = s.mapv(|v| v.max(0.0));
        assert_close(&f64s(out.get("y").unwrap()), &y, 1e-12);
        assert_close(&f64s(out.get("rs").unwrap()), &y.sum_axis(Axis(0)), 1e-12);
        let rmax = s.map_axis(Axis(1), |r| r.iter().cloned().fold(f64::MIN, f64::max)).insert_axis(Axis(1));
        assert_close(&f64s(out.get("rmax").unwrap()), &rmax, 1e-12);
    }

    #[test]
    fn batch_norm_train_matches_pytorch_semantics() {
        // y = (x - mean) / sqrt(var_biased + eps) * gamma + beta; running stats with momentum and
        // the unbiased variance. f64, tolerance 1e-10.
        let (n, c, h, w) = (3, 2, 2, 3);
        let mut r = rng(9);
        let x = uniform(&mut r, DType::F64, &[n, c, h, w]);
        let mut g = Graph::new();
        let xv = g.input("x", DType::F64, &[n, c, h, w]).unwrap();
        let ga = g.input("gamma", DType::F64, &[c]).unwrap();
        let be = g.input("beta", DType::F64, &[c]).unwrap();
        let rm = g.input("rm", DType::F64, &[c]).unwrap();
        let rv = g.input("rv", DType::F64, &[c]).unwrap();
        let o = g.batch_norm_train(xv, ga, be, rm, rv, BatchNorm { eps: 1e-5, momentum: 0.1 }).unwrap();
        g.output("y", o.y).unwrap();
        g.output("rm_new", o.running_mean).unwrap();
        g.output("rv_new", o.running_var).unwrap();
        let gamma = Tensor::f64(&[c], vec![1.5, -0.5]).unwrap();
        let beta = Tensor::f64(&[c], vec![0.25, 2.0]).unwrap();
        let rm0 = Tensor::f64(&[c], vec![0.3, -0.2]).unwrap();
        let rv0 = Tensor::f64(&[c], vec![1.2, 0.7]).unwrap();
        let out = Runner::cpu(&g)
            .unwrap()
            .run(&[("x", &x), ("gamma", &gamma), ("beta", &beta), ("rm", &rm0), ("rv", &rv0)])
            .unwrap();
        let x = f64s(&x);
        let y = f64s(out.get("y").unwrap());
        let cnt = (n * h * w) as f64;
        for ch in 0..c {
            let xs: Vec<f64> = x.index_axis(Axis(1), ch).iter().copied().collect();
            let mean = xs.iter().sum::<f64>() / cnt;
            let var = xs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / cnt;
            let (gm, bt) = (gamma.to_f64_vec()[ch], beta.to_f64_vec()[ch]);
            for (xi, yi) in x.index_axis(Axis(1), ch).iter().zip(y.index_axis(Axis(1), ch).iter()) {
                let want = (xi - mean) / (var + 1e-5).sqrt() * gm + bt;
                assert!((want - yi).abs() < 1e-10, "{want} vs {yi}");
            }
            let rm_want = 0.9 * rm0.to_f64_vec()[ch] + 0.1 * mean;
            let rv_want = 0.9 * rv0.to_f64_vec()[ch] + 0.1 * var * cnt / (cnt - 1.0);
            assert!((out.f64("rm_new").unwrap()[IxDyn(&[ch])] - rm_want).abs() < 1e-10);
            assert!((out.f64("rv_new").unwrap()[IxDyn(&[ch])] - rv_want).abs() < 1e-10);
        }
    }

    #[test]
    fn feeds_are_checked_and_params_default_to_their_initial_values() {
        let mut g = Graph::new();
        let x = g.input("x", DType::F32, &[2]).unwrap();
        let p = g.param("p", &[2], vec![1.0, 2.0]).unwrap();
        let y = g.mul(x, p).unwrap();
        g.output("y", y).unwrap();
        let mut run = Runner::cpu(&g).unwrap();
        let x = Tensor::f32(&[2], vec![3.0, 4.0]).unwrap();
        let out = run.run(&[("x", &x)]).unwrap();
        assert_eq!(out.f32("y").unwrap().as_slice().unwrap(), &[3.0, 8.0]);
        let p2 = Tensor::f32(&[2], vec![0.5, 0.5]).unwrap();
        let out = run.run(&[("x", &x), ("p", &p2)]).unwrap();
        assert_eq!(out.f32("y").unwrap().as_slice().unwrap(), &[1.5, 2.0]);

        let e = run.run(&[]).unwrap_err();
        assert!(matches!(&e, Error::GraphFeed { name, .. } if name == "x"), "{e}");
        let bad = Tensor::f32(&[3], vec![0.0; 3]).unwrap();
        let e = run.run(&[("x", &bad)]).unwrap_err().to_string();
        assert!(e.contains("[2]") && e.contains("[3]"), "{e}");
        let e = run.run(&[("x", &x), ("nope", &x)]).unwrap_err();
        assert!(matches!(&e, Error::GraphFeed { name, .. } if name == "nope"), "{e}");
        // A transposed (non-standard layout) feed is copied, not misread.
        let m = Tensor::F32(ndarray::arr2(&[[1.0f32, 2.0], [3.0, 4.0]]).reversed_axes().into_dyn());
        let mut g = Graph::new();
        let mv = g.input("m", DType::F32, &[2, 2]).unwrap();
        let id = g.identity(mv).unwrap();
        g.output("o", id).unwrap();
        let out = Runner::cpu(&g).unwrap().run(&[("m", &m)]).unwrap();
        assert_eq!(out.f32("o").unwrap().iter().copied().collect::<Vec<_>>(), vec![1.0, 3.0, 2.0, 4.0]);
    }
}

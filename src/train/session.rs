//! The training session: one ONNX Runtime session of a [`StepGraph`], with the parameters,
//! buffers and optimizer state kept as ORT values that each step's `<name>.next` outputs replace.
//!
//! On CPU the state lives in ORT-owned values: each run's `.next` outputs are taken out of the
//! run's results and fed, as they are, to the next run — no copies into Rust vectors. With
//! `--device cuda` (feature `cuda`) two device-resident sets of state tensors are bound with an
//! `IoBinding`, one as inputs and one as the `.next` outputs, and swapped after every step, so
//! parameters never cross PCIe; only the batch goes up and the losses come down.

use std::borrow::Cow;
use std::collections::BTreeMap;

use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, TensorRef};

use crate::graph::{DType, Tensor};
use crate::model::StepGraph;
use crate::runtime::{Device, RuntimeOptions};
use crate::{Error, Result};

/// What one step reports.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOut {
    pub loss: f64,
    pub level_losses: Vec<f64>,
}

/// One fed-back input: its name, its `.next` output, its type and shape.
#[derive(Debug, Clone)]
struct Slot {
    input: String,
    output: String,
    dtype: DType,
    shape: Vec<usize>,
}

/// Runs a [`StepGraph`] step after step, carrying its state. The AdamW `step` input is counted
/// here: the `t`-th call to [`TrainSession::run`] after [`TrainSession::set_steps_done`]`(s)`
/// feeds `s + t`.
pub struct TrainSession {
    session: Session,
    slots: Vec<Slot>,
    /// Current state values (CPU), in `slots` order.
    values: Vec<DynValue>,
    levels: usize,
    /// The batch input (`images`, or `features` for a step over the frozen prefix) and its shape.
    data_input: &'static str,
    data_shape: Vec<usize>,
    labels_shape: Vec<usize>,
    uses_step: bool,
    steps_done: u64,
    /// The NCHWc block size the convolutions were written with, if they were.
    nchwc_block: Option<usize>,
    #[cfg(feature = "cuda")]
    device: Option<cuda::DeviceState>,
}

impl std::fmt::Debug for TrainSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainSession").field("slots", &self.slots.len()).field("steps_done", &self.steps_done).finish()
    }
}

/// A host tensor as an owned ORT value.
pub(crate) fn to_ort(name: &str, t: &Tensor) -> Result<DynValue> {
    let ctx = || format!("creating state value `{name}`");
    let v = match t {
        Tensor::F32(a) => ort::value::Tensor::from_array(a.as_standard_layout().into_owned()).map(|v| v.into_dyn()),
        Tensor::F64(a) => ort::value::Tensor::from_array(a.as_standard_layout().into_owned()).map(|v| v.into_dyn()),
        Tensor::I64(a) => ort::value::Tensor::from_array(a.as_standard_layout().into_owned()).map(|v| v.into_dyn()),
        Tensor::Bool(a) => ort::value::Tensor::from_array(a.as_standard_layout().into_owned()).map(|v| v.into_dyn()),
    };
    v.map_err(|e| Error::ort(ctx(), e))
}

/// An ORT value in host memory as a host tensor.
pub(crate) fn from_ort(name: &str, dtype: DType, v: &DynValue) -> Result<Tensor> {
    let ctx = || format!("reading `{name}`");
    Ok(match dtype {
        DType::F32 => Tensor::F32(v.try_extract_array::<f32>().map_err(|e| Error::ort(ctx(), e))?.to_owned()),
        DType::F64 => Tensor::F64(v.try_extract_array::<f64>().map_err(|e| Error::ort(ctx(), e))?.to_owned()),
        DType::I64 => Tensor::I64(v.try_extract_array::<i64>().map_err(|e| Error::ort(ctx(), e))?.to_owned()),
        DType::Bool => Tensor::Bool(v.try_extract_array::<bool>().map_err(|e| Error::ort(ctx(), e))?.to_owned()),
    })
}

fn scalar(v: &DynValue, name: &str) -> Result<f64> {
    let a = v.try_extract_array::<f32>().map_err(|e| Error::ort(format!("reading `{name}`"), e))?;
    a.iter().next().map(|&x| x as f64).ok_or_else(|| Error::ort(format!("reading `{name}`"), "empty output"))
}

fn check_feed(name: &str, t: &Tensor, dtype: DType, shape: &[usize]) -> Result<()> {
    if t.dtype() != dtype || t.shape() != shape {
        return Err(Error::GraphFeed {
            name: name.into(),
            reason: format!("declared {dtype}{shape:?}, fed {}{:?}", t.dtype(), t.shape()),
        });
    }
    Ok(())
}

impl TrainSession {
    /// Compiles `step` into a session on `opts.device` and loads `state` (every fed-back input
    /// by name, e.g. from a checkpoint) or, with `None`, the graph's initial values.
    pub fn new(step: &StepGraph, opts: &RuntimeOptions, state: Option<BTreeMap<String, Tensor>>) -> Result<Self> {
        let g = &step.graph;
        let slots: Vec<Slot> = g
            .feedback()
            .iter()
            .map(|&(i, o)| Slot {
                input: g.name(i).to_string(),
                output: g.name(o).to_string(),
                dtype: g.dtype(i),
                shape: g.shape(i).to_vec(),
            })
            .collect();
        let state = state.unwrap_or_else(|| step.initial_state());
        if let Some(extra) = state.keys().find(|k| !slots.iter().any(|s| &s.input == *k)) {
            return Err(Error::ModelState { name: extra.clone(), reason: "the step graph has no such state".into() });
        }
        let mut host = Vec::with_capacity(slots.len());
        for s in &slots {
            let t = state
                .get(&s.input)
                .ok_or_else(|| Error::ModelState { name: s.input.clone(), reason: "missing from the state".into() })?;
            check_feed(&s.input, t, s.dtype, &s.shape)
                .map_err(|e| Error::ModelState { name: s.input.clone(), reason: e.to_string() })?;
            host.push(t);
        }
        let nchwc_block = match opts.device {
            crate::runtime::Device::Cpu if step.lowering.cpu_nchwc => crate::graph::nchwc::block_size(),
            _ => None,
        };
        let write = crate::graph::WriteOptions { nchwc_block, ..Default::default() };
        let bytes = g.to_onnx_with("hiercon-step", write)?;
        let session = crate::runtime::init()?.session_from_bytes(opts, &bytes)?;
        let info = |n: &str| g.find(n).map(|v| g.shape(v).to_vec()).unwrap_or_default();
        let mut s = TrainSession {
            session,
            values: Vec::new(),
            levels: step.levels,
            data_input: step.data_input,
            data_shape: info(step.data_input),
            labels_shape: info("labels"),
            uses_step: step.needs_step(),
            steps_done: 0,
            nchwc_block,
            #[cfg(feature = "cuda")]
            device: None,
            slots,
        };
        match opts.device {
            Device::Cpu => {
                s.values = s.slots.iter().zip(&host).map(|(sl, t)| to_ort(&sl.input, t)).collect::<Result<_>>()?;
            }
            #[cfg(feature = "cuda")]
            Device::Cuda => s.device = Some(cuda::DeviceState::new(&s.session, &s.slots, &host)?),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => {
                return Err(Error::ProviderUnavailable {
                    provider: "cuda",
                    reason: "this hiercon was built without the `cuda` feature".into(),
                });
            }
        }
        Ok(s)
    }

    /// The NCHWc block size the step's convolutions run with (`GradOptions::cpu_nchwc` on a
    /// CPU session where ORT's NCHWc kernels work), or `None` for standard Convs.
    pub fn nchwc_block(&self) -> Option<usize> {
        self.nchwc_block
    }

    /// Number of updates already applied (AdamW's step count before the next run).
    pub fn steps_done(&self) -> u64 {
        self.steps_done
    }

    /// Sets the number of updates already applied, when resuming from a checkpoint.
    pub fn set_steps_done(&mut self, n: u64) {
        self.steps_done = n;
    }

    /// Runs one step on the batch (`images` f32 `[2N, 3, S, S]`, or the frozen prefix's
    /// `features` f32 `[2N, C, H, W]`, as the step graph was built) and `labels` i64 `[N, K]`
    /// with learning rate `lr`; the state moves on to the step's `.next` outputs.
    pub fn run(&mut self, images: &Tensor, labels: &Tensor, lr: f64) -> Result<StepOut> {
        check_feed(self.data_input, images, DType::F32, &self.data_shape)?;
        check_feed("labels", labels, DType::I64, &self.labels_shape)?;
        let images = images.as_f32().expect("checked").as_standard_layout();
        let labels = labels.as_i64().expect("checked").as_standard_layout();
        let wrap = |e| Error::ort("wrapping the batch", e);
        let lr_v = ort::value::Tensor::from_array(ndarray::arr0(lr as f32)).map_err(wrap)?;
        let step_v = ort::value::Tensor::from_array(ndarray::arr0(self.steps_done as i64 + 1)).map_err(wrap)?;
        #[cfg(feature = "cuda")]
        if let Some(dev) = &mut self.device {
            // Owned host values: the binding holds them until the next step rebinds.
            let mut batch = vec![
                (self.data_input, to_ort(self.data_input, &Tensor::F32(images.into_owned()))?),
                ("labels", to_ort("labels", &Tensor::I64(labels.into_owned()))?),
                ("lr", lr_v.into_dyn()),
            ];
            if self.uses_step {
                batch.push(("step", step_v.into_dyn()));
            }
            let out = dev.run(&mut self.session, &self.slots, self.levels, &batch)?;
            self.steps_done += 1;
            return Ok(out);
        }
        let images_v = TensorRef::from_array_view(images.view()).map_err(wrap)?;
        let labels_v = TensorRef::from_array_view(labels.view()).map_err(wrap)?;
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(self.slots.len() + 4);
        inputs.push((self.data_input.into(), images_v.into()));
        inputs.push(("labels".into(), labels_v.into()));
        inputs.push(("lr".into(), lr_v.into()));
        if self.uses_step {
            inputs.push(("step".into(), step_v.into()));
        }
        for (s, v) in self.slots.iter().zip(&self.values) {
            inputs.push((Cow::Borrowed(s.input.as_str()), v.into()));
        }
        let mut out = self.session.run(inputs).map_err(|e| Error::ort("running the training step", e))?;
        let result = StepOut {
            loss: scalar(out.get("loss").ok_or_else(|| Error::ort("running the training step", "no `loss`"))?, "loss")?,
            level_losses: (0..self.levels)
                .map(|i| {
                    let n = format!("level_loss.{i}");
                    scalar(out.get(&n).ok_or_else(|| Error::ort("running the training step", format!("no `{n}`")))?, &n)
                })
                .collect::<Result<_>>()?,
        };
        let next = self
            .slots
            .iter()
            .map(|s| {
                out.remove(&s.output)
                    .ok_or_else(|| Error::ort("running the training step", format!("no `{}`", s.output)))
            })
            .collect::<Result<Vec<_>>>()?;
        drop(out);
        self.values = next;
        self.steps_done += 1;
        Ok(result)
    }

    /// The current state (every fed-back input by name) copied to host tensors, e.g. for a
    /// checkpoint or export.
    pub fn state(&self) -> Result<BTreeMap<String, Tensor>> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = &self.device {
            return dev.state(&self.slots);
        }
        self.slots
            .iter()
            .zip(&self.values)
            .map(|(s, v)| Ok((s.input.clone(), from_ort(&s.input, s.dtype, v)?)))
            .collect()
    }
}

#[cfg(feature = "cuda")]
mod cuda;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{AdamW, Carried, GradOptions, Optimizer, Runner};
    use crate::model::step_graph;
    use crate::model::testing::{batch, test_loss, tiny};

    #[test]
    fn three_steps_equal_runner_with_carried_state_and_resume_continues() {
        // AdamW (so the session's step counter matters), lr changing per step. Same ORT graph on
        // both sides: losses and every state tensor agree to 1e-6 relative.
        let cfg = tiny();
        let (n, k) = (4, 2);
        let opt = Optimizer::AdamW(AdamW::default());
        let sg = step_graph(&cfg, None, n, k, &opt, &GradOptions::default(), test_loss).unwrap();
        let mut sess = TrainSession::new(&sg, &RuntimeOptions::default(), None).unwrap();
        let mut run = Runner::cpu(&sg.graph).unwrap();
        let mut carried = Carried::new(&sg.graph).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * (1.0 + b.abs());
        let mut snapshot = None;
        let mut batches = Vec::new();
        for t in 1..=3u64 {
            let (images, labels) = batch(&cfg, n, k, 50 + t);
            let lr = 0.01 / t as f64;
            let got = sess.run(&images, &labels, lr).unwrap();
            let lr_t = Tensor::F32(ndarray::arr0(lr as f32).into_dyn());
            let step_t = Tensor::I64(ndarray::arr0(t as i64).into_dyn());
            let mut feeds = vec![("images", &images), ("labels", &labels), ("lr", &lr_t), ("step", &step_t)];
            feeds.extend(carried.feeds());
            let out = run.run(&feeds).unwrap();
            carried.update(&out).unwrap();
            let want = out.get("loss").unwrap().to_f64_vec()[0];
            assert!(close(got.loss, want), "step {t}: {} vs {want}", got.loss);
            assert_eq!(got.level_losses.len(), 2);
            assert!(close(got.level_losses[1], out.get("level_loss.1").unwrap().to_f64_vec()[0]));
            if t == 2 {
                snapshot = Some(sess.state().unwrap());
            }
            batches.push((images, labels, lr));
        }
        assert_eq!(sess.steps_done(), 3);
        let state = sess.state().unwrap();
        assert_eq!(state.len(), sg.graph.feedback().len());
        for (name, t) in &state {
            let want = carried.get(name).unwrap().to_f64_vec();
            for (a, b) in t.to_f64_vec().iter().zip(&want) {
                assert!(close(*a, *b), "{name}: {a} vs {b}");
            }
        }
        // Parameters did move.
        assert_ne!(state["conv1.weight"], sg.initial_state()["conv1.weight"]);
        // Resuming from the state after step 2 and replaying step 3 gives the same state.
        let mut resumed = TrainSession::new(&sg, &RuntimeOptions::default(), snapshot).unwrap();
        resumed.set_steps_done(2);
        let (images, labels, lr) = &batches[2];
        resumed.run(images, labels, *lr).unwrap();
        assert_eq!(resumed.state().unwrap(), state);
    }

    #[test]
    fn nchwc_convolutions_take_the_same_steps() {
        // The tiny resnet-mini has 32/64/128 channels, so its dense convolutions (forward and
        // input gradients) are lowered; three SGD steps agree with the standard session.
        let cfg = tiny();
        let (n, k) = (4, 2);
        let opt = Optimizer::Sgd(crate::graph::Sgd { momentum: 0.9, weight_decay: 1e-4, nesterov: false });
        let session = |cpu_nchwc| {
            let grad = GradOptions { cpu_nchwc, ..GradOptions::default() };
            let sg = step_graph(&cfg, None, n, k, &opt, &grad, test_loss).unwrap();
            TrainSession::new(&sg, &RuntimeOptions::default(), None).unwrap()
        };
        let block = crate::graph::nchwc::block_size().expect("NCHWc kernels on this machine");
        let sg = step_graph(&cfg, None, n, k, &opt, &GradOptions::default(), test_loss).unwrap();
        let lowered = sg.graph.nodes().iter().filter(|nd| crate::graph::nchwc::eligible(&sg.graph, nd, block)).count();
        assert!(lowered >= 8, "{lowered} convolutions lowered");
        let (mut plain, mut blocked) = (session(false), session(true));
        assert_eq!((plain.nchwc_block(), blocked.nchwc_block()), (None, Some(block)));
        for t in 1..=3u64 {
            let (images, labels) = batch(&cfg, n, k, 70 + t);
            let a = plain.run(&images, &labels, 0.05).unwrap();
            let b = blocked.run(&images, &labels, 0.05).unwrap();
            assert!((a.loss - b.loss).abs() <= 1e-4 * (1.0 + a.loss.abs()), "step {t}: {} vs {}", a.loss, b.loss);
        }
        let (sa, sb) = (plain.state().unwrap(), blocked.state().unwrap());
        for (name, t) in &sa {
            let (a, b) = (t.to_f64_vec(), sb[name].to_f64_vec());
            let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (u, v) in a.iter().zip(&b) {
                assert!((u - v).abs() <= 1e-4 * (1.0 + scale), "{name}: {u} vs {v}");
            }
        }
    }

    #[test]
    fn bad_state_and_feeds_are_named() {
        let cfg = tiny();
        let sg = step_graph(&cfg, None, 2, 1, &Optimizer::AdamW(AdamW::default()), &GradOptions::default(), test_loss)
            .unwrap();
        let mut state = sg.initial_state();
        state.remove("head.fc1.bias");
        let e = TrainSession::new(&sg, &RuntimeOptions::default(), Some(state)).unwrap_err();
        assert!(matches!(&e, Error::ModelState { name, .. } if name == "head.fc1.bias"), "{e}");
        let mut sess = TrainSession::new(&sg, &RuntimeOptions::default(), None).unwrap();
        let (images, labels) = batch(&cfg, 3, 1, 1);
        let e = sess.run(&images, &labels, 0.1).unwrap_err();
        assert!(matches!(&e, Error::GraphFeed { name, .. } if name == "images"), "{e}");
        assert_eq!(sess.steps_done(), 0);
    }
}

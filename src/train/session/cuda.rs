//! CUDA state for [`TrainSession`](super::TrainSession): two device-resident sets of state
//! tensors bound with one `IoBinding`, inputs from one set and `.next` outputs into the other,
//! swapped after every step.

use std::collections::BTreeMap;

use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{DynTensor, DynTensorValueType, DynValue};

use super::{Slot, StepOut, from_ort, scalar, to_ort};
use crate::graph::{DType, Tensor};
use crate::{Error, Result};

pub(super) struct DeviceState {
    /// Two sets of device tensors, in slot order; `sets[current]` holds the current state.
    sets: [Vec<DynTensor>; 2],
    current: usize,
    binding: IoBinding,
    host_out: MemoryInfo<'static>,
}

fn ort_err(ctx: &str) -> impl Fn(ort::Error) -> Error + '_ {
    move |e| Error::ort(ctx, e)
}

fn device_tensor(alloc: &Allocator, dtype: DType, shape: &[usize]) -> Result<DynTensor> {
    let shape = shape.to_vec();
    let e = ort_err("allocating device state");
    Ok(match dtype {
        DType::F32 => ort::value::Tensor::<f32>::new(alloc, shape).map_err(e)?.upcast(),
        DType::F64 => ort::value::Tensor::<f64>::new(alloc, shape).map_err(e)?.upcast(),
        DType::I64 => ort::value::Tensor::<i64>::new(alloc, shape).map_err(e)?.upcast(),
        DType::Bool => ort::value::Tensor::<bool>::new(alloc, shape).map_err(e)?.upcast(),
    })
}

impl DeviceState {
    /// Allocates both sets on CUDA device 0 and copies the initial state into the first.
    pub fn new(session: &Session, slots: &[Slot], host: &[&Tensor]) -> Result<Self> {
        let mem = MemoryInfo::new(AllocationDevice::CUDA, 0, AllocatorType::Device, MemoryType::Default)
            .map_err(ort_err("CUDA memory info"))?;
        let alloc = Allocator::new(session, mem).map_err(ort_err("CUDA allocator"))?;
        let mut sets: [Vec<DynTensor>; 2] = [Vec::new(), Vec::new()];
        for (s, t) in slots.iter().zip(host) {
            let mut a = device_tensor(&alloc, s.dtype, &s.shape)?;
            let b = device_tensor(&alloc, s.dtype, &s.shape)?;
            let h = to_ort(&s.input, t)?.downcast::<DynTensorValueType>().map_err(ort_err("host state"))?;
            h.copy_into(&mut a).map_err(ort_err("copying state to the device"))?;
            sets[0].push(a);
            sets[1].push(b);
        }
        let host_out = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::CPUOutput)
            .map_err(ort_err("CPU memory info"))?;
        let binding = session.create_binding().map_err(ort_err("creating the IoBinding"))?;
        Ok(DeviceState { sets, current: 0, binding, host_out })
    }

    /// One step: binds the batch and both state sets, runs, reads the losses, swaps the sets.
    pub fn run(
        &mut self,
        session: &mut Session,
        slots: &[Slot],
        levels: usize,
        batch: &[(&str, DynValue)],
    ) -> Result<StepOut> {
        let e = ort_err("binding the training step");
        for (name, v) in batch {
            self.binding.bind_input(*name, v).map_err(&e)?;
        }
        let (cur, next) = (self.current, 1 - self.current);
        let [a, b] = &mut self.sets;
        let (inputs, outputs) = if cur == 0 { (&*a, b) } else { (&*b, a) };
        for (i, s) in slots.iter().enumerate() {
            self.binding.bind_input(s.input.as_str(), &inputs[i]).map_err(&e)?;
            self.binding.bind_output(s.output.as_str(), &mut outputs[i]).map_err(&e)?;
        }
        let names: Vec<String> =
            std::iter::once("loss".to_string()).chain((0..levels).map(|i| format!("level_loss.{i}"))).collect();
        for n in &names {
            self.binding.bind_output_to_device(n.as_str(), &self.host_out).map_err(&e)?;
        }
        let out = session.run_binding(&self.binding).map_err(ort_err("running the training step"))?;
        let mut vals = Vec::with_capacity(names.len());
        for n in &names {
            let v = out.get(n.as_str()).ok_or_else(|| Error::ort("running the training step", format!("no `{n}`")))?;
            vals.push(scalar(v, n)?);
        }
        drop(out);
        self.current = next;
        Ok(StepOut { loss: vals[0], level_losses: vals[1..].to_vec() })
    }

    /// The current state copied to the host.
    pub fn state(&self, slots: &[Slot]) -> Result<BTreeMap<String, Tensor>> {
        slots
            .iter()
            .zip(&self.sets[self.current])
            .map(|(s, t)| {
                let h = t.to(AllocationDevice::CPU, 0).map_err(ort_err("copying state to the host"))?;
                Ok((s.input.clone(), from_ort(&s.input, s.dtype, &h.into_dyn())?))
            })
            .collect()
    }
}

//! Training: batch samplers (trainer loop, schedules and checkpoints to come, issue 4).

pub mod sampler;

pub use sampler::{Batch, Sampler, SamplerConfig, SamplerKind, SamplerState, SamplerStats, SlotRole};

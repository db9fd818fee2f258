//! Training: batch samplers, checkpoints, the step-graph session (trainer loop and schedules to come, issue 4).

pub mod checkpoint;
pub mod sampler;
pub mod session;

pub use checkpoint::{CHECKPOINT_FORMAT, Checkpoint};
pub use sampler::{Batch, Sampler, SamplerConfig, SamplerKind, SamplerState, SamplerStats, SlotRole};
pub use session::{StepOut, TrainSession};

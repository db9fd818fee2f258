//! Training: batch samplers, the learning-rate schedule, checkpoints, the step-graph session and
//! the training loop behind `hiercon train`.

pub mod checkpoint;
pub mod sampler;
pub mod schedule;
pub mod session;
pub mod trainer;
pub mod views;

pub use checkpoint::{CHECKPOINT_FORMAT, Checkpoint};
pub use sampler::{Batch, Sampler, SamplerConfig, SamplerKind, SamplerState, SamplerStats, SlotRole};
pub use schedule::Schedule;
pub use session::{StepOut, TrainSession};
pub use trainer::{
    OptimizerKind, RunDir, StepMetrics, TrainConfig, TrainEnv, TrainOutcome, plot_losses, read_metrics, replot, train,
};
pub use views::{ViewCache, ViewKey};

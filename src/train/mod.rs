//! Sampler, trainer loop, schedules and checkpoints (issue 4; not built yet).

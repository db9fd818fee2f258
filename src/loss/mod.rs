//! Hierarchical contrastive losses and baselines (issue 4; not built yet).

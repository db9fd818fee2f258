//! Retrieval evaluation: per-level accuracy, NMI, kNN accuracy, reports (issue 7; not built yet).

//! HNSW index generations, filters and search (issue 5; not built yet).

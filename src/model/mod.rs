//! Backbones, projection head and inference export (issue 3; not built yet).

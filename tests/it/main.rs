//! hiercon's integration tests, one binary (one link step): each module covers one subsystem
//! through the public library API and, where it matters, the real `hiercon` binary.

mod catalogue;
mod eval;
mod http;
mod index;
mod loss;
mod pretrained;
mod serve;
mod train;

//! The integration tests of the `ramole` binary, one module per area, in one test binary.

mod cli;
mod common;
mod hub;
mod library;
mod retriever;
mod router;
mod serve;
mod train;

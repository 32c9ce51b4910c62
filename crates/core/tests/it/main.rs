//! The integration tests of ramole-core, one module per area, in one binary (a binary per
//! file would link the whole crate again for each).

mod architecture;
mod catalog;
mod common;
mod embed;
mod engine;
mod hub;
mod index;
mod lora;
mod model;
mod retrieval_eval;
mod retriever;
mod router;
mod tasks;
mod train;

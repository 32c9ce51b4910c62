//! ramole-core: the headless library of RAMoLE desktop. The CLI and the desktop shell are thin
//! layers over it; it never depends on tauri.

pub mod adapter;
pub mod batch;
pub mod catalog;
pub mod chat;
pub mod config;
pub mod device;
pub mod embed;
pub mod engine;
pub mod files;
pub mod hub;
pub mod index;
pub mod library;
pub mod metrics;
pub mod model;
pub mod mole;
pub mod retrieve;
pub mod router;
pub mod tasks;
pub mod train;
pub mod transcript;
pub mod vocab;

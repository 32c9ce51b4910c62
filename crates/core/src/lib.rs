//! ramole-core: the headless library of RAMoLE desktop. The CLI and the desktop shell are thin
//! layers over it; it never depends on tauri.

pub mod adapter;
pub mod config;
pub mod embed;
pub mod model;
pub mod mole;

//! ramole-kernels: every hand-written SIMD routine of RAMoLE desktop, and the one CPU-feature
//! detector ([`Isa`]) that chooses between them at run time.
//!
//! Each routine module holds the routine's data layout, its portable reference (plain Rust,
//! what every other set is tested against) and the dispatch on [`Isa`]; the SIMD bodies live in
//! one file per instruction set under `cpu/` (as candle-core's `cpu/{avx,neon}.rs`):
//!
//! | routine | what | sets |
//! |---|---|---|
//! | [`gemm`] | few-row GEMM against a pre-packed weight (the query encoder) | AVX2, AVX-512, AMX |
//! | [`activation`] | GELU (erf), `exp` for the softmax, row softmax | AVX2 |
//! | [`attention`] | causal attention of new tokens against the KV cache, tiled by kv head | AVX-512, AVX2 |
//! | [`lowrank`] | the LoRA decode loops `y += s B (A x)`, `dot`, int8 `B` rows ([`lowrank::QRows`]) | AVX2 |
//! | [`qdot`] | quantized (Q8_0) or f32 weight rows against few activation rows | AVX2 |
//! | [`qmat`] | GGUF-typed weights repacked into panels × int8 activations (decode and prefill) | AVX-512 VNNI, AVX2 |
//! | [`scan`] | f32 query against f16 rows (the adapter index's exact scan) | AVX2 |
//!
//! A new instruction set (aarch64 NEON, say) is a new `cpu/neon.rs`, an [`Isa`] variant and
//! one arm in each routine's dispatch; a GPU device would sit beside `cpu/` the same way.
//! Callers never name an instruction set: they call the routine (optionally with an [`Isa`] to
//! compare sets side by side).
//!
//! This crate is compiled at opt-level 3 in every profile (the workspace's `Cargo.toml`), so
//! tests time and check the same code the release build runs.

pub mod activation;
pub mod attention;
mod cpu;
pub mod gemm;
mod isa;
pub mod lowrank;
pub mod qdot;
pub mod qmat;
pub mod scan;

pub use isa::Isa;

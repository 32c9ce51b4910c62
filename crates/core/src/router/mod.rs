//! RAMoLE's RouterLoRA (ramole-paper.md 2.4): per-token gates over the adapters retrieved for a
//! request, computed at every LoRA site by a small LoRA-shaped router, plus the record of those
//! gates per layer and token that a reply's provenance keeps. Owns the router's weights and file
//! format (`weights`), a request's experts stacked per site (`mix`), the batched routed term
//! (`delta`) and the gate record (`trace`); the plan vocabulary is `vocab`'s, the training loop
//! `train::router`'s.
//!
//! At a site with router factors `A_r` `[r, in]`, `B_r` `[out, r]` and the row's experts
//! `(A_i, s_i B_i)`, for each token `x`:
//! `h_i = A_i x`, `q = A_r x`, `score_i = qᵀ C_i h_i / √r` with `C_i = B_rᵀ s_i B_i`
//! (precomputed when the experts are compiled), `α = softmax(score)`, output `Σ α_i s_i B_i h_i`.
//! The `out`-sized values `v_i = s_i B_i A_i x` are never formed to score them; [`reference`]
//! forms them (the formula as written), and the tests compare the two.
//!
//! Rows of a batch each have their own experts (the paper's mapping matrix): the base runs the
//! batch once, and at each site every row's tokens are routed over that row's experts only — a
//! union of all rows' experts behind a mask would cost every token the whole batch's experts.
//! Experts dropped in training (Random LoRA Dropout) are masked (score `-∞` → gate 0). Gates are
//! f32 and sum to 1 per token and site.

mod delta;
mod mix;
mod trace;
mod weights;

use std::path::PathBuf;

pub use delta::{RoutedRow, RouterDelta, RowGates, dropout_keep};
pub use mix::{ExpertRef, RouterMix, RouterRef, reference, route};
pub use trace::{GateTrace, MAX_GATE_COLUMNS};
pub use weights::{MAX_RANK, ROUTER_FORMAT, RouterConfig, RouterLora, RouterSite, config_for};

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("router: {0}")]
    Invalid(String),
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = RouterError> = std::result::Result<T, E>;

//! The encoder's fast path for one sequence: the same BERT forward as the candle reference in
//! `embed/mod.rs`, on weights packed once at load ([`PackedMatrix`]) with bias, GELU and the
//! residual fused into the GEMMs, attention done directly per head (no padding, no mask), and
//! the work of each step split over the rayon pool. f32 throughout, like the reference.

use ramole_kernels::Isa;
use ramole_kernels::activation::{lane_sum, softmax_scaled};
use ramole_kernels::gemm::{self, Epilogue, PackedMatrix, SharedOut};

/// LayerNorm parameters over the hidden dimension.
pub(super) struct NormParams {
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub eps: f32,
}

impl NormParams {
    /// Normalises each row of `x` `[rows, h]` in place.
    fn apply(&self, x: &mut [f32]) {
        let h = self.w.len();
        for row in x.chunks_exact_mut(h) {
            let mean = lane_sum(row) / h as f32;
            let mut sq = [0f32; 8];
            let mut chunks = row.chunks_exact(8);
            for c in &mut chunks {
                for (s, &v) in sq.iter_mut().zip(c) {
                    *s += (v - mean) * (v - mean);
                }
            }
            let tail: f32 = chunks
                .remainder()
                .iter()
                .map(|v| (v - mean) * (v - mean))
                .sum();
            let var = (sq.iter().sum::<f32>() + tail) / h as f32;
            let inv = 1.0 / (var + self.eps).sqrt();
            for ((v, &w), &b) in row.iter_mut().zip(&self.w).zip(&self.b) {
                *v = (*v - mean) * inv * w + b;
            }
        }
    }
}

pub(super) struct PackedLayer {
    /// `[h] -> [3h]`: query, key, value.
    pub qkv: PackedMatrix,
    pub attn_out: PackedMatrix,
    pub attn_norm: NormParams,
    pub ffn_in: PackedMatrix,
    pub ffn_out: PackedMatrix,
    pub ffn_norm: NormParams,
}

/// The embedding tables the forward reads rows of (borrowed from the reference's tensors).
pub(super) struct Tables<'a> {
    /// `[vocab, h]`.
    pub word: &'a [f32],
    /// `[positions, h]`.
    pub position: &'a [f32],
    /// Row 0 of the token-type table, `[h]`.
    pub token_type: &'a [f32],
}

pub(super) struct PackedEncoder {
    pub layers: Vec<PackedLayer>,
    pub embed_norm: NormParams,
    pub heads: usize,
    pub hidden: usize,
    pub isa: Isa,
}

impl PackedEncoder {
    /// The L2-normalised mean-pooled embedding `[h]` of one token sequence (ids already
    /// checked against the vocabulary and the positions). Runs on the rayon pool.
    pub fn embed(&self, tables: &Tables<'_>, ids: &[u32]) -> Vec<f32> {
        // On a pool thread, the fork-joins inside are cheap local pushes instead of a blocking
        // injection from outside for every step.
        rayon::scope(|_| self.forward(tables, ids))
    }

    fn forward(&self, tables: &Tables<'_>, ids: &[u32]) -> Vec<f32> {
        let h = self.hidden;
        let t = ids.len().max(1);
        let threads = rayon::current_num_threads();
        let mut x = vec![0f32; t * h];
        for (i, row) in x.chunks_exact_mut(h).enumerate() {
            // The tokenizer always adds [CLS] and [SEP]; an empty id list would read as one [PAD].
            let id = ids.get(i).copied().unwrap_or(0) as usize;
            let word = &tables.word[id * h..(id + 1) * h];
            let pos = &tables.position[i * h..(i + 1) * h];
            for (((v, &w), &p), &tt) in row.iter_mut().zip(word).zip(pos).zip(tables.token_type) {
                *v = w + p + tt;
            }
        }
        self.embed_norm.apply(&mut x);
        let ff = self.layers.first().map_or(0, |l| l.ffn_in.n());
        let mut qkv = vec![0f32; t * 3 * h];
        let mut ctx = vec![0f32; t * h];
        let mut y = vec![0f32; t * h];
        let mut inner = vec![0f32; t * ff];
        for l in &self.layers {
            gemm::gemm(
                self.isa,
                &x,
                h,
                t,
                &l.qkv,
                Epilogue::Bias,
                &mut qkv,
                3 * h,
                threads,
            );
            self.attention(&qkv, t, &mut ctx, threads);
            let res = Epilogue::Residual { r: &x, ldr: h };
            gemm::gemm(self.isa, &ctx, h, t, &l.attn_out, res, &mut y, h, threads);
            l.attn_norm.apply(&mut y);
            std::mem::swap(&mut x, &mut y);
            gemm::gemm(
                self.isa,
                &x,
                h,
                t,
                &l.ffn_in,
                Epilogue::Gelu,
                &mut inner,
                ff,
                threads,
            );
            let res = Epilogue::Residual { r: &x, ldr: h };
            gemm::gemm(self.isa, &inner, ff, t, &l.ffn_out, res, &mut y, h, threads);
            l.ffn_norm.apply(&mut y);
            std::mem::swap(&mut x, &mut y);
        }
        let mut mean = vec![0f32; h];
        for row in x.chunks_exact(h) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        let inv_t = 1.0 / t as f32;
        mean.iter_mut().for_each(|m| *m *= inv_t);
        let norm = lane_sum(&mean.iter().map(|v| v * v).collect::<Vec<_>>())
            .sqrt()
            .max(1e-12);
        mean.iter_mut().for_each(|m| *m /= norm);
        mean
    }

    /// Multi-head self-attention of one unmasked sequence: `qkv` `[t, 3h]` (query, key, value
    /// side by side, head `j` at columns `j·d..(j+1)·d` of each) -> `ctx` `[t, h]`. Heads are
    /// split over `threads`.
    fn attention(&self, qkv: &[f32], t: usize, ctx: &mut [f32], threads: usize) {
        let (h, heads) = (self.hidden, self.heads);
        let d = h / heads;
        let scale = 1.0 / (d as f32).sqrt();
        assert!(
            qkv.len() >= t * 3 * h && ctx.len() >= t * h,
            "attention buffers"
        );
        let out = SharedOut::new(ctx);
        let parts = if t * t * h < 1 << 14 { 1 } else { threads };
        gemm::split_across(0..heads, parts, &|range| {
            let mut keys = PackedMatrix::empty();
            let mut values = PackedMatrix::empty();
            let mut scores = vec![0f32; t * t];
            let mut head_out = vec![0f32; t * d];
            for j in range {
                let q = &qkv[j * d..];
                keys.set_rows(&qkv[h + j * d..], 3 * h, t, d, None);
                values.set_cols(&qkv[2 * h + j * d..], 3 * h, t, d);
                gemm::gemm(
                    self.isa,
                    q,
                    3 * h,
                    t,
                    &keys,
                    Epilogue::Bias,
                    &mut scores,
                    t,
                    1,
                );
                for row in scores.chunks_exact_mut(t) {
                    softmax_scaled(self.isa, row, scale);
                }
                let bias = Epilogue::Bias;
                gemm::gemm(self.isa, &scores, t, t, &values, bias, &mut head_out, d, 1);
                for (i, row) in head_out.chunks_exact(d).enumerate() {
                    // SAFETY: `ctx` holds `[t, h]` (asserted above); head `j` writes only its
                    // columns `j·d..(j+1)·d` of row `i < t`, and each head is in one range.
                    unsafe {
                        let dst = out.ptr().add(i * h + j * d);
                        std::ptr::copy_nonoverlapping(row.as_ptr(), dst, d);
                    }
                }
            }
        });
    }
}

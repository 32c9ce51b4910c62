//! Causal attention of new tokens against a KV cache, read in place: one query row at a time,
//! each its own scores, softmax and weighted sum of values, so what a token gets depends only on
//! its position and the cached keys and values — not on how many tokens were fed with it. A
//! prompt prefilled in one step, in chunks beside other rows, or token by token gives the same
//! bits (a last-bit difference would flip the int8 rounding of the next layer's activations and,
//! eventually, a greedy token). The AVX2 set compiles the same loops with AVX2 and FMA enabled,
//! with fused multiply-adds, and takes the 8-lane `exp` of [`crate::activation`]; the portable
//! set multiplies and adds separately (a software `fmaf` would crawl), so the two differ in the
//! last bits, each always the same on one machine.

use rayon::prelude::*;

use crate::Isa;
use crate::activation::softmax_scaled;

/// Where the keys or values of one layer sit: `data[start + h * head_stride + p * head_dim ..]`
/// holds position `p` of kv head `h` (the cache's `[kv_heads, capacity, head_dim]` buffer).
#[derive(Clone, Copy, Debug)]
pub struct KvView<'a> {
    pub data: &'a [f32],
    pub start: usize,
    pub head_stride: usize,
}

impl<'a> KvView<'a> {
    #[inline(always)]
    fn row(&self, head: usize, p: usize, hd: usize) -> &'a [f32] {
        let s = self.start + head * self.head_stride + p * hd;
        &self.data[s..s + hd]
    }
}

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Attention {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Keys `window` or more positions behind a query are not attended (sliding window).
    pub window: Option<usize>,
    pub scale: f32,
}

/// Query rows below this many multiply-adds stay on the calling thread.
const PAR_MIN_WORK: usize = 1 << 15;

impl Attention {
    /// `out[i, h, :] = softmax_j(scale q[h, i, :] · k[h / group, j, :]) v[h / group, j, :]` over
    /// the positions `j` token `i` (at position `pos + i`) may see. `q` `[heads, t, head_dim]`,
    /// `out` `[t, heads * head_dim]`; `k`, `v` hold at least positions `0 .. pos + t`.
    pub fn causal(self, q: &[f32], pos: usize, k: KvView<'_>, v: KvView<'_>, out: &mut [f32]) {
        self.causal_with(Isa::detect(), q, pos, k, v, out)
    }

    /// [`Attention::causal`] with the kernels of `isa` (one of [`Isa::available`]).
    pub fn causal_with(
        self,
        isa: Isa,
        q: &[f32],
        pos: usize,
        k: KvView<'_>,
        v: KvView<'_>,
        out: &mut [f32],
    ) {
        let hd = self.head_dim;
        assert!(
            self.heads.is_multiple_of(self.kv_heads.max(1)) && hd > 0,
            "attention sizes do not fit: {self:?}"
        );
        let t = q.len() / (self.heads * hd);
        assert!(
            q.len() == t * self.heads * hd && out.len() == q.len(),
            "attention operands do not fit {self:?}: q {}, out {}",
            q.len(),
            out.len()
        );
        for kv in [&k, &v] {
            let last = kv.start + (self.kv_heads - 1) * kv.head_stride + (pos + t) * hd;
            assert!(
                kv.data.len() >= last,
                "the cache holds {} values, {last} needed",
                kv.data.len()
            );
        }
        // One work item per (token, head): `out`'s chunks of `head_dim`.
        let one = |(idx, o): (usize, &mut [f32])| {
            let (i, h) = (idx / self.heads, idx % self.heads);
            let qi = &q[(h * t + i) * hd..(h * t + i + 1) * hd];
            self.one_query(isa, qi, pos + i, h, k, v, o);
        };
        let work = t * self.heads * (pos + t) * hd;
        if work < PAR_MIN_WORK {
            out.chunks_mut(hd).enumerate().for_each(one);
        } else {
            out.par_chunks_mut(hd).enumerate().for_each(one);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn one_query(
        self,
        isa: Isa,
        q: &[f32],
        at: usize,
        head: usize,
        k: KvView<'_>,
        v: KvView<'_>,
        out: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if isa.has_avx2() {
            // SAFETY: `has_avx2` holds only for sets chosen after detecting AVX2 and FMA.
            unsafe { crate::cpu::avx2::attention_query(self, isa, q, at, head, k, v, out) };
            return;
        }
        self.query_portable::<false>(isa, q, at, head, k, v, out)
    }

    /// One query at position `at` of head `head` into `out` `[head_dim]`. `FMA`: fused
    /// multiply-adds (the AVX2 set; a software `fmaf` would be slow on the portable one).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn query_portable<const FMA: bool>(
        self,
        isa: Isa,
        q: &[f32],
        at: usize,
        head: usize,
        k: KvView<'_>,
        v: KvView<'_>,
        out: &mut [f32],
    ) {
        let hd = self.head_dim;
        let kvh = head / (self.heads / self.kv_heads);
        let first = self.window.map_or(0, |w| (at + 1).saturating_sub(w));
        // Plain loops, no closures: a closure would not inherit the caller's target features,
        // and `mul_add` would become a call to the software `fmaf`.
        let mut scores = vec![0f32; at + 1 - first];
        for (s, p) in scores.iter_mut().zip(first..=at) {
            *s = score::<FMA>(q, k.row(kvh, p, hd));
        }
        softmax_scaled(isa, &mut scores, self.scale);
        out.fill(0.0);
        for (p, &w) in (first..=at).zip(&scores) {
            for (o, &x) in out.iter_mut().zip(v.row(kvh, p, hd)) {
                *o = madd::<FMA>(w, x, *o);
            }
        }
    }
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `q · k` with 8 partial sums folded as a tree (what vector registers fold cheaply).
#[inline(always)]
fn score<const FMA: bool>(q: &[f32], k: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (cq, ck) = (q.chunks_exact(8), k.chunks_exact(8));
    let mut tail = 0f32;
    for (&a, &b) in cq.remainder().iter().zip(ck.remainder()) {
        tail = madd::<FMA>(a, b, tail);
    }
    for (a, b) in cq.zip(ck) {
        for l in 0..8 {
            acc[l] = madd::<FMA>(a[l], b[l], acc[l]);
        }
    }
    let h = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    ((h[0] + h[2]) + (h[1] + h[3])) + tail
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// The textbook form in f64: every score, the max-shifted softmax, the weighted sum.
    fn naive(a: Attention, q: &[f32], pos: usize, k: &[f32], v: &[f32], cap: usize) -> Vec<f64> {
        let hd = a.head_dim;
        let t = q.len() / (a.heads * hd);
        let mut out = vec![0f64; q.len()];
        for i in 0..t {
            let at = pos + i;
            for h in 0..a.heads {
                let kvh = h / (a.heads / a.kv_heads);
                let qi = &q[(h * t + i) * hd..][..hd];
                let first = a.window.map_or(0, |w| (at + 1).saturating_sub(w));
                let s: Vec<f64> = (first..=at)
                    .map(|p| {
                        let kr = &k[(kvh * cap + p) * hd..][..hd];
                        qi.iter()
                            .zip(kr)
                            .map(|(&x, &y)| x as f64 * y as f64)
                            .sum::<f64>()
                            * a.scale as f64
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (p, w) in (first..=at).zip(&e) {
                    let vr = &v[(kvh * cap + p) * hd..][..hd];
                    for d in 0..hd {
                        out[(i * a.heads + h) * hd + d] += w / z * vr[d] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_set_matches_the_f64_form_and_any_split_of_the_tokens_gives_the_same_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (heads, kv_heads, hd, window) in
            [(4, 2, 16, None), (6, 1, 24, Some(5)), (2, 2, 8, None)]
        {
            let a = Attention {
                heads,
                kv_heads,
                head_dim: hd,
                window,
                scale: 1.0 / (hd as f32).sqrt(),
            };
            let (pos, t, cap) = (3, 29, 40);
            let rand_vec = |n: usize, rng: &mut rand::rngs::StdRng| -> Vec<f32> {
                (0..n).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect()
            };
            let k = rand_vec(kv_heads * cap * hd, &mut rng);
            let v = rand_vec(kv_heads * cap * hd, &mut rng);
            let q = rand_vec(heads * t * hd, &mut rng);
            let view = |d| view(d, cap * hd);
            let want = naive(a, &q, pos, &k, &v, cap);
            let mut whole = Vec::new();
            for isa in Isa::available() {
                let mut out = vec![0f32; q.len()];
                a.causal_with(isa, &q, pos, view(&k), view(&v), &mut out);
                for (j, (&g, &w)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - w).abs() < 1e-5,
                        "{isa:?} {a:?} [{j}]: {g} vs {w}"
                    );
                }
                if isa == Isa::detect() {
                    whole = out;
                }
            }
            // The same tokens fed in pieces of 1, 4 and 11: bit for bit what the whole gave.
            for piece in [1, 4, 11] {
                let mut at = 0;
                while at < t {
                    let n = piece.min(t - at);
                    let mut qp = Vec::with_capacity(heads * n * hd);
                    for h in 0..heads {
                        qp.extend_from_slice(&q[(h * t + at) * hd..(h * t + at + n) * hd]);
                    }
                    let mut out = vec![0f32; qp.len()];
                    a.causal(&qp, pos + at, view(&k), view(&v), &mut out);
                    let part = &whole[at * heads * hd..(at + n) * heads * hd];
                    assert!(
                        out.iter()
                            .zip(part)
                            .all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{a:?}: tokens {at}..{} fed {piece} at a time differ",
                        at + n
                    );
                    at += n;
                }
            }
        }
    }

    fn view(data: &[f32], head_stride: usize) -> KvView<'_> {
        KvView {
            data,
            start: 0,
            head_stride,
        }
    }

    #[test]
    #[should_panic(expected = "the cache holds")]
    fn a_cache_shorter_than_the_positions_is_refused() {
        let a = Attention {
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            window: None,
            scale: 0.5,
        };
        let kv = vec![0f32; 4 * 3];
        let view = KvView {
            data: &kv,
            start: 0,
            head_stride: 12,
        };
        let mut out = vec![0f32; 8];
        a.causal(&[0.0; 8], 3, view, view, &mut out);
    }
}

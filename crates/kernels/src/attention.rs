//! Causal attention of new tokens against a KV cache, read in place. This module owns the
//! operand layout ([`KvView`], [`Attention`]), the work split, the set-independent tiled
//! algorithm (generic over a set's lanes, [`Lanes`]), its portable lanes, and the slow
//! per-query reference ([`Attention::causal_reference_with`]) the tiled form is tested and
//! benchmarked against.
//!
//! What a token gets depends only on its position, its query and the cached keys and values —
//! not on how many tokens were fed with it nor which tile it landed in: a prompt prefilled in
//! one step, in chunks beside other rows, or token by token gives the same bits (a last-bit
//! difference would flip the int8 rounding of the next layer's activations and, eventually, a
//! greedy token). The tiled form keeps that by giving every (query, key) and every (query,
//! value lane) its own fixed chain of operations, whatever the tile around it:
//!
//! * a work item is one kv head and up to [`ROWS_PER_ITEM`] rows (query × q head of that kv
//!   head's group), so each K and V row is read once for the whole group, from L1 (keys are
//!   walked in blocks of [`KEY_BLOCK_BYTES`]);
//! * a score `q · k` is `head_dim / L` fused multiply-adds per lane (lane `l` takes
//!   `d = l, l + L, …`) and then the lanes folded in halves (`L/2`, …, 1): the same for every
//!   tile shape (4 rows × 4 keys, 2 × 8, 1 × 16 on AVX-512), whose folding networks only decide
//!   where each sum lands;
//! * the softmax runs on a query's own score row (max, `exp((s - max) · scale)` on vectors
//!   counted from the row's first key, a lane-wise sum folded the same way);
//! * `Σ_p w_p v_p` is one multiply-add chain per output lane over the query's keys in
//!   increasing position; a tile's rows whose ranges differ at the causal diagonal or the window
//!   edge take their own steps there (a guarded loop), never a zero weight; the output is that
//!   sum times `1 / Σ_p w_p`.
//!
//! Sets differ in the last bits (AVX-512: 16 lanes, AVX2: 8, both fused; portable: 8 lanes of
//! separate multiplies and adds, as a software `fmaf` would crawl), each always the same on one
//! machine. Head sizes the lanes do not divide take the per-query reference of their set.

use std::cell::Cell;

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

/// Calls below this many multiply-adds stay on the calling thread.
const PAR_MIN_WORK: usize = 1 << 15;

/// Rows (query × q head of one kv group) per work item: their score rows (a few hundred KiB at
/// a thousand keys) stay in L2, and each K/V row loaded into L1 serves them all.
const ROWS_PER_ITEM: usize = 48;

/// Bytes of K (or V) of one key block: half of a 32 KiB L1.
const KEY_BLOCK_BYTES: usize = 16 << 10;

/// Rows of one multiply-add tile of `Σ w v` (6 × 4 zmm accumulators on AVX-512).
const PV_ROWS: usize = 6;

/// The first position a query at `at` attends.
#[inline(always)]
fn first_key(window: Option<usize>, at: usize) -> usize {
    window.map_or(0, |w| (at + 1).saturating_sub(w))
}

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
        let t = self.check(q, pos, k, v, out);
        let Some(lanes) = tiled_lanes(isa, self.head_dim) else {
            return self.causal_reference_with(isa, q, pos, k, v, out);
        };
        if t == 0 {
            return;
        }
        let group = self.heads / self.kv_heads;
        let per_item = (ROWS_PER_ITEM / group).max(1);
        let items: Vec<(usize, usize)> = (0..self.kv_heads)
            .flat_map(|g| (0..t).step_by(per_item).map(move |i0| (g, i0)))
            .collect();
        let call = Call {
            a: self,
            q,
            t,
            pos,
            k,
            v,
        };
        let dst = OutPtr(out.as_mut_ptr());
        let run = |&(g, i0): &(usize, usize)| {
            let tile = call.tile(g, i0, (i0 + per_item).min(t));
            // SAFETY: the items are distinct (kv head, query range) pairs, and `tile` writes
            // only the outputs of its own heads and queries, inside `out` (checked above).
            unsafe { tile.run(lanes, dst) };
        };
        let work = t * self.heads * (pos + t) * self.head_dim;
        if work < PAR_MIN_WORK {
            items.iter().for_each(run);
        } else {
            items.par_iter().for_each(run);
        }
    }

    /// The slow reference of [`Attention::causal_with`]: one (token, head) query at a time,
    /// its scores with 8 partial sums, [`softmax_scaled`], then the weighted sum of values
    /// (fused multiply-adds on the AVX2 and AVX-512 sets). The tiled form is tested and
    /// benchmarked against it; head sizes the tiled lanes do not divide run it.
    pub fn causal_reference_with(
        self,
        isa: Isa,
        q: &[f32],
        pos: usize,
        k: KvView<'_>,
        v: KvView<'_>,
        out: &mut [f32],
    ) {
        let t = self.check(q, pos, k, v, out);
        let hd = self.head_dim;
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

    /// Checks the operands' sizes; returns the number of new tokens.
    fn check(self, q: &[f32], pos: usize, k: KvView<'_>, v: KvView<'_>, out: &[f32]) -> usize {
        let hd = self.head_dim;
        assert!(
            self.kv_heads > 0
                && self.heads.is_multiple_of(self.kv_heads)
                && hd > 0
                && self.window != Some(0),
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
        t
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
        self.query_reference::<false>(isa, q, at, head, k, v, out)
    }

    /// One query at position `at` of head `head` into `out` `[head_dim]`. `FMA`: fused
    /// multiply-adds (the AVX2 set; a software `fmaf` would be slow on the portable one).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn query_reference<const FMA: bool>(
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
        let first = first_key(self.window, at);
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

// ---- the tiled form -------------------------------------------------------------------------

/// The lanes of the tiled form for a set and head size: a function of those two alone, so a
/// query's arithmetic never depends on the call around it. `None`: the per-query reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TiledLanes {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

fn tiled_lanes(isa: Isa, hd: usize) -> Option<TiledLanes> {
    #[cfg(target_arch = "x86_64")]
    {
        if isa.has_avx512() && hd.is_multiple_of(16) {
            return Some(TiledLanes::Avx512);
        }
        if isa.has_avx2() {
            return hd.is_multiple_of(8).then_some(TiledLanes::Avx2);
        }
    }
    (!isa.has_avx2() && hd.is_multiple_of(8)).then_some(TiledLanes::Portable)
}

/// `L` f32 lanes of one kernel set, as the tiled form uses them: the set's body of
/// [`Tile::compute`] is that generic function compiled inside the set's `#[target_feature]`
/// entry, where these (inlined) methods become single instructions.
///
/// # Safety
/// The methods may use CPU features: they run only inside a function compiled for, and
/// entered after detecting, the set's features. Pointers are valid for `L` floats.
pub(crate) unsafe trait Lanes {
    type V: Copy;
    const L: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, x: Self::V);
    /// `a · b + c`: fused on the x86 sets, a multiply then an add on the portable one.
    unsafe fn madd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn exp(x: Self::V) -> Self::V;
    /// `xs` holds `L` vectors; lane `n` of the result is [`fold`] of `xs[n]`'s lanes.
    unsafe fn fold_each(xs: &[Self::V]) -> Self::V;
}

/// The lanes of `x` (`L` of them, a power of two) summed in halves: `x[l] += x[l + L/2]`, then
/// `L/4`, …, 1. Every sum of lanes in this module takes this tree.
#[inline(always)]
pub(crate) fn fold(x: &mut [f32]) -> f32 {
    let mut n = x.len();
    while n > 1 {
        n /= 2;
        for l in 0..n {
            x[l] += x[l + n];
        }
    }
    x[0]
}

/// Eight lanes in plain Rust, multiplies and adds unfused.
pub(crate) struct Portable8;

// SAFETY: plain Rust; the pointers are valid for 8 floats (the trait's contract).
unsafe impl Lanes for Portable8 {
    type V = [f32; 8];
    const L: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        // SAFETY: `p` is valid for 8 floats (the trait's contract).
        unsafe { p.cast::<[f32; 8]>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, x: Self::V) {
        // SAFETY: as in `load`.
        unsafe { p.cast::<[f32; 8]>().write_unaligned(x) }
    }
    #[inline(always)]
    unsafe fn madd(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] * b[l] + c[l])
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] + b[l])
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] - b[l])
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l] * b[l])
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|l| a[l].max(b[l]))
    }
    #[inline(always)]
    unsafe fn exp(x: Self::V) -> Self::V {
        x.map(f32::exp)
    }
    #[inline(always)]
    unsafe fn fold_each(xs: &[Self::V]) -> Self::V {
        std::array::from_fn(|n| fold(&mut { xs[n] }))
    }
}

/// The operands of one call, shared by its work items.
#[derive(Clone, Copy)]
struct Call<'a> {
    a: Attention,
    q: &'a [f32],
    t: usize,
    pos: usize,
    k: KvView<'a>,
    v: KvView<'a>,
}

/// `out`'s base, shared by the work items (each writes its own rows).
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the items write disjoint parts of `out` (see `causal_with`) and the call waits for
// all of them.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

thread_local! {
    /// A work item's scores, accumulators and sums, kept between calls: a fresh buffer of a
    /// few hundred KiB per item would be mapped and faulted in each time.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// One work item: kv head `g`, queries `i0 .. i1` and every q head of `g`'s group, as rows
/// `r = (i - i0) · group + (h - g · group)`; keys `base ..= last` (what any of them sees).
pub(crate) struct Tile<'a> {
    call: Call<'a>,
    g: usize,
    i0: usize,
    rows: usize,
    base: usize,
    last: usize,
    /// The score rows' stride (at least `last + 1 - base`).
    ld: usize,
}

impl<'a> Call<'a> {
    fn tile(self, g: usize, i0: usize, i1: usize) -> Tile<'a> {
        let group = self.a.heads / self.a.kv_heads;
        let base = first_key(self.a.window, self.pos + i0);
        let last = self.pos + i1 - 1;
        Tile {
            call: self,
            g,
            i0,
            rows: (i1 - i0) * group,
            base,
            last,
            ld: (last + 1 - base).next_multiple_of(16),
        }
    }
}

impl Tile<'_> {
    /// Computes the tile and writes its rows of `out`.
    ///
    /// # Safety
    /// `out` is the call's output (`[t, heads * head_dim]`); no other thread writes this
    /// tile's rows meanwhile.
    unsafe fn run(&self, lanes: TiledLanes, out: OutPtr) {
        let a = self.call.a;
        let hd = a.head_dim;
        let mut buf = SCRATCH.take();
        let need = self.rows * (self.ld + hd + 1);
        if buf.len() < need {
            buf.resize(need, 0.0);
        }
        let (scores, rest) = buf.split_at_mut(self.rows * self.ld);
        let (acc, rest) = rest.split_at_mut(self.rows * hd);
        let inv = &mut rest[..self.rows];
        match lanes {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `tiled_lanes` picks these lanes only for sets with AVX-512F (and AVX2,
            // FMA); the buffers have the sizes `compute` needs.
            TiledLanes::Avx512 => unsafe {
                crate::cpu::avx512::attention_tile(self, scores, acc, inv)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, with AVX2 and FMA.
            TiledLanes::Avx2 => unsafe { crate::cpu::avx2::attention_tile(self, scores, acc, inv) },
            // SAFETY: plain Rust; the buffers fit.
            TiledLanes::Portable => unsafe { self.compute::<Portable8>(scores, acc, inv) },
        }
        let group = a.heads / a.kv_heads;
        for (r, (row, &s)) in acc.chunks_exact(hd).zip(inv.iter()).enumerate() {
            let (i, h) = (self.i0 + r / group, self.g * group + r % group);
            // SAFETY: query `i < t` and head `h < heads` name one `head_dim` slice of `out`,
            // this tile's alone (the caller's contract).
            let o =
                unsafe { std::slice::from_raw_parts_mut(out.0.add((i * a.heads + h) * hd), hd) };
            for (o, &x) in o.iter_mut().zip(row) {
                *o = x * s;
            }
        }
        SCRATCH.set(buf);
    }

    /// Row `r`'s query.
    #[inline(always)]
    fn q_row(&self, r: usize) -> *const f32 {
        let (c, group) = (&self.call, self.call.a.heads / self.call.a.kv_heads);
        let (i, h) = (self.i0 + r / group, self.g * group + r % group);
        c.q[(h * c.t + i) * c.a.head_dim..].as_ptr()
    }

    /// Row `r`'s keys: `first ..= at`.
    #[inline(always)]
    fn range(&self, r: usize) -> (usize, usize) {
        let group = self.call.a.heads / self.call.a.kv_heads;
        let at = self.call.pos + self.i0 + r / group;
        (first_key(self.call.a.window, at), at)
    }

    /// Scores, softmax and `Σ w v` of every row into `acc` `[rows, head_dim]`, unnormalised,
    /// and `1 / Σ w` into `inv` `[rows]`. `scores` holds `rows · ld` floats.
    ///
    /// # Safety
    /// Run inside a function compiled for `S`'s features, after detecting them; the buffers
    /// have the sizes above; the call's operands were checked by `Attention::check`.
    #[inline(always)]
    pub(crate) unsafe fn compute<S: Lanes>(
        &self,
        scores: &mut [f32],
        acc: &mut [f32],
        inv: &mut [f32],
    ) {
        let hd = self.call.a.head_dim;
        let (l, rows) = (S::L, self.rows);
        debug_assert!(hd.is_multiple_of(l) && scores.len() >= rows * self.ld);
        let block = (KEY_BLOCK_BYTES / (4 * hd)).next_multiple_of(16);
        let (k, v) = (self.call.k, self.call.v);
        let k0 = k.data[k.start + self.g * k.head_stride..].as_ptr();
        let v0 = v.data[v.start + self.g * v.head_stride..].as_ptr();
        let sp = scores.as_mut_ptr();

        // Scores of every row against every key of the tile, block by block of keys.
        let mut b0 = self.base;
        while b0 <= self.last {
            let b1 = (b0 + block).min(self.last + 1);
            let mut r = 0;
            while r < rows {
                let left = rows - r;
                // SAFETY: rows `r ..` exist; keys `b0 .. b1` lie in `base ..= last`, which
                // the cache holds; the score rows have `ld >= last + 1 - base` columns.
                r += unsafe {
                    if l == 16 && left >= 4 {
                        self.qk::<S, 4, 4>(r, b0, b1, k0, sp)
                    } else if left >= 2 && l == 16 {
                        self.qk::<S, 2, 8>(r, b0, b1, k0, sp)
                    } else if l == 16 {
                        self.qk::<S, 1, 16>(r, b0, b1, k0, sp)
                    } else if left >= 2 {
                        self.qk::<S, 2, 4>(r, b0, b1, k0, sp)
                    } else {
                        self.qk::<S, 1, 8>(r, b0, b1, k0, sp)
                    }
                };
            }
            b0 = b1;
        }

        // Each row's softmax over its own keys, in place.
        for (r, s) in inv.iter_mut().enumerate().take(rows) {
            let (first, at) = self.range(r);
            let row =
                &mut scores[r * self.ld + first - self.base..r * self.ld + at + 1 - self.base];
            // SAFETY: the caller's contract.
            *s = unsafe { softmax_row::<S>(row, self.call.a.scale) };
        }

        // `acc = Σ_p w_p v_p`, block by block of keys, panel by panel of lanes.
        acc[..rows * hd].fill(0.0);
        let chunks = hd / l;
        let panel = if l == 16 && chunks.is_multiple_of(4) {
            4
        } else if chunks.is_multiple_of(2) {
            2
        } else {
            1
        };
        let (ap, sp) = (acc.as_mut_ptr(), scores.as_ptr());
        let mut b0 = self.base;
        while b0 <= self.last {
            let b1 = (b0 + block).min(self.last + 1);
            for d0 in (0..hd).step_by(panel * l) {
                let mut r = 0;
                while r < rows {
                    let n = (rows - r).min(PV_ROWS);
                    macro_rules! pv {
                        ($($n:literal)*) => {
                            match (n, panel) {
                                $( ($n, 4) => self.pv::<S, $n, 4>(r, d0, b0, b1, v0, sp, ap),
                                   ($n, 2) => self.pv::<S, $n, 2>(r, d0, b0, b1, v0, sp, ap), )*
                                $( ($n, _) => self.pv::<S, $n, 1>(r, d0, b0, b1, v0, sp, ap), )*
                                _ => unreachable!(),
                            }
                        };
                    }
                    // SAFETY: rows `r .. r + n` exist; lanes `d0 .. d0 + panel · L` lie in
                    // the head; keys `b0 .. b1` in the cache.
                    unsafe { pv!(1 2 3 4 5 6) };
                    r += n;
                }
            }
            b0 = b1;
        }
    }

    /// Scores of rows `r0 .. r0 + RB` against keys `b0 .. b1`, `KB` keys at a time
    /// (`RB · KB = L`); a last group past `last` repeats key `last` and keeps what is in range.
    /// Returns `RB`.
    ///
    /// # Safety
    /// As [`Tile::compute`]'s; `k0` is kv head `g`'s position 0, `sp` the score rows.
    #[inline(always)]
    unsafe fn qk<S: Lanes, const RB: usize, const KB: usize>(
        &self,
        r0: usize,
        b0: usize,
        b1: usize,
        k0: *const f32,
        sp: *mut f32,
    ) -> usize {
        debug_assert_eq!(RB * KB, S::L);
        let hd = self.call.a.head_dim;
        let l = S::L;
        let mut qp = [std::ptr::null::<f32>(); RB];
        for (x, p) in qp.iter_mut().enumerate() {
            *p = self.q_row(r0 + x);
        }
        let mut j = b0;
        while j < b1 {
            let mut kp = [k0; KB];
            for (x, p) in kp.iter_mut().enumerate() {
                // SAFETY: position `min(j + x, last)` is in the cache (checked by the caller).
                *p = unsafe { k0.add((j + x).min(self.last) * hd) };
            }
            // SAFETY: `q_row`s and `kp`s are valid for `head_dim` floats, read `L` at a time;
            // the caller runs this inside `S`'s features.
            unsafe {
                let mut acc = [[S::zero(); KB]; RB];
                for c in 0..hd / l {
                    let mut qv = [S::zero(); RB];
                    for x in 0..RB {
                        qv[x] = S::load(qp[x].add(c * l));
                    }
                    for kk in 0..KB {
                        let kv = S::load(kp[kk].add(c * l));
                        for x in 0..RB {
                            acc[x][kk] = S::madd(qv[x], kv, acc[x][kk]);
                        }
                    }
                }
                let mut xs = [S::zero(); 16];
                for x in 0..RB {
                    for kk in 0..KB {
                        xs[x * KB + kk] = acc[x][kk];
                    }
                }
                let mut sums = [0f32; 16];
                S::store(sums.as_mut_ptr(), S::fold_each(&xs[..l]));
                let n = KB.min(b1 - j);
                for x in 0..RB {
                    let dst = sp.add((r0 + x) * self.ld + j - self.base);
                    // A fixed-length copy when the group is whole: no call to `memcpy`.
                    if n == KB {
                        std::ptr::copy_nonoverlapping(sums.as_ptr().add(x * KB), dst, KB);
                    } else {
                        std::ptr::copy_nonoverlapping(sums.as_ptr().add(x * KB), dst, n);
                    }
                }
            }
            j += KB;
        }
        RB
    }

    /// `acc[r, d0 .. d0 + CB·L] += Σ_p w[r, p] v[p, d0 ..]` for rows `r0 .. r0 + RB` and the
    /// keys of `b0 .. b1` each row sees, in increasing `p`: the keys all rows see without a
    /// test, those at the diagonal or window edge row by row.
    ///
    /// # Safety
    /// As [`Tile::compute`]'s; `v0` is kv head `g`'s position 0, `sp` the softmaxed score
    /// rows, `ap` the accumulators `[rows, head_dim]`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    // Index loops over the register tile: unrolled with constant indices, it stays in registers.
    #[allow(clippy::needless_range_loop)]
    unsafe fn pv<S: Lanes, const RB: usize, const CB: usize>(
        &self,
        r0: usize,
        d0: usize,
        b0: usize,
        b1: usize,
        v0: *const f32,
        sp: *const f32,
        ap: *mut f32,
    ) {
        let hd = self.call.a.head_dim;
        let l = S::L;
        let (mut first, mut at) = ([0usize; RB], [0usize; RB]);
        for x in 0..RB {
            (first[x], at[x]) = self.range(r0 + x);
        }
        let lo = first.iter().copied().min().unwrap_or(0).max(b0);
        let hi = at.iter().copied().max().unwrap_or(0).min(b1 - 1);
        if lo > hi {
            return;
        }
        let all_lo = first.iter().copied().max().unwrap_or(0).max(b0);
        let all_hi = at.iter().copied().min().unwrap_or(0).min(b1 - 1);
        let (head_end, tail_start) = if all_lo <= all_hi {
            (all_lo, all_hi + 1)
        } else {
            (hi + 1, hi + 1)
        };
        // SAFETY: row `r0 + x`'s score `p` sits at `(r0 + x) · ld + p - base` for `p` in
        // `base ..= last`; `v0 + p · hd + d0 ..` holds `CB · L` floats of position `p`;
        // the accumulators `[rows, hd]` hold lanes `d0 .. d0 + CB · L`.
        unsafe {
            let mut acc = [[S::zero(); CB]; RB];
            for x in 0..RB {
                for c in 0..CB {
                    acc[x][c] = S::load(ap.add((r0 + x) * hd + d0 + c * l));
                }
            }
            // A macro, not a closure: the steps must inline into the set's entry function.
            macro_rules! step {
                ($p:expr, $guarded:expr) => {{
                    let p = $p;
                    let mut vv = [S::zero(); CB];
                    for c in 0..CB {
                        vv[c] = S::load(v0.add(p * hd + d0 + c * l));
                    }
                    for x in 0..RB {
                        if !$guarded || (first[x] <= p && p <= at[x]) {
                            let wx = S::splat(*sp.add((r0 + x) * self.ld + p - self.base));
                            for c in 0..CB {
                                acc[x][c] = S::madd(wx, vv[c], acc[x][c]);
                            }
                        }
                    }
                }};
            }
            for p in lo..head_end {
                step!(p, true);
            }
            for p in head_end..tail_start {
                step!(p, false);
            }
            for p in tail_start..=hi {
                step!(p, true);
            }
            for x in 0..RB {
                for c in 0..CB {
                    S::store(ap.add((r0 + x) * hd + d0 + c * l), acc[x][c]);
                }
            }
        }
    }
}

/// `row[i] = exp((row[i] - max) · scale)`; returns `1 / Σ row`. Vectors are counted from the
/// row's first key; the last, partial one is padded (its extra lanes count as 0 in the sum).
///
/// # Safety
/// Inside a function compiled for `S`'s features.
#[inline(always)]
unsafe fn softmax_row<S: Lanes>(row: &mut [f32], scale: f32) -> f32 {
    let (l, n) = (S::L, row.len());
    let full = n / l * l;
    let p = row.as_mut_ptr();
    let mut tmp = [0f32; 16];
    // SAFETY: `p + i` for `i + L <= full` is in the row; `tmp` holds 16 >= L floats.
    unsafe {
        let mut mv = S::splat(f32::NEG_INFINITY);
        for i in (0..full).step_by(l) {
            mv = S::max(mv, S::load(p.add(i)));
        }
        S::store(tmp.as_mut_ptr(), mv);
        let mut m = tmp[..l].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for &x in &row[full..] {
            m = m.max(x);
        }
        let (mv, sc) = (S::splat(m), S::splat(scale));
        let mut sum = S::zero();
        for i in (0..full).step_by(l) {
            let e = S::exp(S::mul(S::sub(S::load(p.add(i)), mv), sc));
            S::store(p.add(i), e);
            sum = S::add(sum, e);
        }
        if full < n {
            let tail = n - full;
            tmp = [m; 16];
            tmp[..tail].copy_from_slice(&row[full..]);
            let e = S::exp(S::mul(S::sub(S::load(tmp.as_ptr()), mv), sc));
            S::store(tmp.as_mut_ptr(), e);
            row[full..].copy_from_slice(&tmp[..tail]);
            tmp[tail..].fill(0.0);
            sum = S::add(sum, S::load(tmp.as_ptr()));
        }
        S::store(tmp.as_mut_ptr(), sum);
        1.0 / fold(&mut tmp[..l])
    }
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

    /// Every set against the f64 form and the per-query reference, then the same tokens fed
    /// in `pieces` (each set): bit for bit what the whole call gave.
    fn check(a: Attention, pos: usize, t: usize, pieces: &[usize], seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (heads, hd) = (a.heads, a.head_dim);
        let cap = pos + t + 3;
        let rand_vec = |n: usize, rng: &mut rand::rngs::StdRng| -> Vec<f32> {
            (0..n).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect()
        };
        let k = rand_vec(a.kv_heads * cap * hd, &mut rng);
        let v = rand_vec(a.kv_heads * cap * hd, &mut rng);
        let q = rand_vec(heads * t * hd, &mut rng);
        let view = |d| view(d, cap * hd);
        let want = naive(a, &q, pos, &k, &v, cap);
        for isa in Isa::available() {
            let mut whole = vec![0f32; q.len()];
            a.causal_with(isa, &q, pos, view(&k), view(&v), &mut whole);
            let mut reference = vec![0f32; q.len()];
            a.causal_reference_with(isa, &q, pos, view(&k), view(&v), &mut reference);
            for (j, ((&g, &w), &r)) in whole.iter().zip(&want).zip(&reference).enumerate() {
                assert!(
                    (g as f64 - w).abs() < 1e-5 && (r as f64 - w).abs() < 1e-5,
                    "{isa:?} {a:?} [{j}]: {g} (reference {r}) vs {w}"
                );
            }
            for &piece in pieces {
                let mut at = 0;
                while at < t {
                    let n = piece.min(t - at);
                    let mut qp = Vec::with_capacity(heads * n * hd);
                    for h in 0..heads {
                        qp.extend_from_slice(&q[(h * t + at) * hd..(h * t + at + n) * hd]);
                    }
                    let mut out = vec![0f32; qp.len()];
                    a.causal_with(isa, &qp, pos + at, view(&k), view(&v), &mut out);
                    let part = &whole[at * heads * hd..(at + n) * heads * hd];
                    assert!(
                        out.iter()
                            .zip(part)
                            .all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{isa:?} {a:?}: tokens {at}..{} fed {piece} at a time differ",
                        at + n
                    );
                    at += n;
                }
            }
        }
    }

    fn sizes(heads: usize, kv_heads: usize, hd: usize, window: Option<usize>) -> Attention {
        Attention {
            heads,
            kv_heads,
            head_dim: hd,
            window,
            scale: 1.0 / (hd as f32).sqrt(),
        }
    }

    #[test]
    fn every_set_matches_the_f64_form_and_any_split_of_the_tokens_gives_the_same_bits() {
        for (heads, kv_heads, hd, window) in
            [(4, 2, 16, None), (6, 1, 24, Some(5)), (2, 2, 8, None)]
        {
            check(sizes(heads, kv_heads, hd, window), 3, 29, &[1, 4, 11], 7);
        }
    }

    /// The models' shapes (SmolLM2: 3 q heads per kv head, head 64; Qwen2.5-0.5B: 7, 64;
    /// Qwen2.5-1.5B: 6, 128) over several work items and key blocks, with and without a window,
    /// and an odd head size: splits that cut tiles and blocks anywhere give the same bits.
    #[test]
    fn the_models_shapes_give_the_same_bits_whatever_the_tiles() {
        for (i, (heads, kv_heads, hd, window)) in [
            (9, 3, 64, None),
            (14, 2, 64, Some(37)),
            (12, 2, 128, None),
            (12, 2, 128, Some(70)),
            (4, 1, 40, None),
        ]
        .into_iter()
        .enumerate()
        {
            check(
                sizes(heads, kv_heads, hd, window),
                71,
                60,
                &[1, 7, 17],
                i as u64,
            );
        }
    }

    /// Each set's network that folds many vectors at once takes, for every vector, the tree of
    /// `fold`: the same bits as folding it alone.
    #[test]
    fn the_fold_networks_take_the_scalar_tree() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let xs: Vec<f32> = (0..256)
            .map(|_| (rng.random::<f32>() - 0.5) * 10f32.powi(rng.random_range(-3..4)))
            .collect();
        fn each<S: Lanes>(xs: &[f32]) -> Vec<f32> {
            let l = S::L;
            // SAFETY: called only after detecting `S`'s features; `xs` holds `L · L` floats.
            unsafe {
                let vs: Vec<S::V> = (0..l).map(|n| S::load(xs[n * l..].as_ptr())).collect();
                let mut out = vec![0f32; l];
                S::store(out.as_mut_ptr(), S::fold_each(&vs));
                out
            }
        }
        let scalar = |l: usize| -> Vec<f32> {
            (0..l)
                .map(|n| fold(&mut xs[n * l..(n + 1) * l].to_vec()))
                .collect()
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&each::<Portable8>(&xs)), bits(&scalar(8)));
        #[cfg(target_arch = "x86_64")]
        {
            if Isa::detect().has_avx2() {
                let got = each::<crate::cpu::avx2::Lanes8>(&xs);
                assert_eq!(bits(&got), bits(&scalar(8)));
            }
            if Isa::detect().has_avx512() {
                let got = each::<crate::cpu::avx512::Lanes16>(&xs);
                assert_eq!(bits(&got), bits(&scalar(16)));
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

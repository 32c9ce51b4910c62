//! Single-precision GEMM for few rows against a pre-packed weight: `y = x · wᵀ + b` with the
//! bias, GELU or a residual add fused into the store. Built for the encoder of one query
//! (tens of rows against 384..1536-wide weights), where a general GEMM spends its time
//! re-packing the weight and waking threads.
//!
//! The weight is packed once into panels of [`NR`] output columns, each panel `k` cache lines
//! of `NR` floats (k-major), so the micro-kernel streams one line per step of `k` and keeps an
//! [`MR`]`×NR` tile of the output in registers. Output panels are split across the rayon pool.

use std::ops::Range;

/// Output columns per panel: two AVX2 registers, one 64-byte line.
pub const NR: usize = 16;
/// Rows per register tile (`MR × 2` accumulators + 2 weight registers + 1 broadcast ≤ 16 ymm).
pub const MR: usize = 6;
/// Rows of `x` kept hot per pass over the weight panels (sized to stay in a 512 KiB L2).
const CHUNK_BYTES: usize = 192 << 10;
/// Below this many multiply-adds a product runs on the calling thread: a hand-off costs more.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// The instruction set the kernels use, chosen once at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// x86-64 with AVX2, FMA and F16C.
    Avx2Fma,
    /// Plain Rust (autovectorised for the target's baseline).
    Portable,
}

impl Isa {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2Fma;
        }
        Isa::Portable
    }
}

/// One k-step of a panel; the alignment makes every step one cache line and every load aligned.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([f32; NR]);

const ZERO_LINE: Line = Line([0.0; NR]);

/// A k-step stored as IEEE half floats (half the memory traffic; widened in the kernel).
#[repr(C, align(32))]
#[derive(Clone, Copy)]
struct HalfLine([u16; NR]);

/// A k-step stored as signed 8-bit integers; the panel's per-column scales turn the sums back
/// into f32 in the epilogue (a quarter of the f32 memory traffic).
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct QuantLine([i8; NR]);

/// How a packed weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    /// IEEE f16, products and sums still in f32.
    F16,
    /// Symmetric int8 with one scale per output column (`max |w| / 127`); the activations stay
    /// f32 (weight-only quantisation): `Σ x·q` is summed in f32 and scaled once.
    Int8,
}

/// A `[k] -> [n]` linear map packed for the micro-kernel, with its bias (zero when none).
pub struct PackedMatrix {
    k: usize,
    n: usize,
    /// `panels × k` lines; panel `p`, step `kk` holds `w[p·NR + j, kk]` for `j < NR`, zero
    /// past `n`.
    lines: Vec<Line>,
    /// The same as f16 when stored at [`Precision::F16`] (then `lines` is empty).
    half: Vec<HalfLine>,
    /// The same as int8 when stored at [`Precision::Int8`] (then `lines` is empty), with
    /// `scale` one line per panel.
    quant: Vec<QuantLine>,
    scale: Vec<Line>,
    /// One line per panel, zero past `n`.
    bias: Vec<Line>,
}

impl PackedMatrix {
    pub fn empty() -> Self {
        Self {
            k: 0,
            n: 0,
            lines: Vec::new(),
            half: Vec::new(),
            quant: Vec::new(),
            scale: Vec::new(),
            bias: Vec::new(),
        }
    }

    /// Packs a Linear weight `w` `[n, k]` (row `j`, stride `ldw`, holds output `j`'s weights)
    /// and its bias `[n]`.
    pub fn from_rows(w: &[f32], ldw: usize, n: usize, k: usize, bias: Option<&[f32]>) -> Self {
        let mut p = Self::empty();
        p.set_rows(w, ldw, n, k, bias);
        p
    }

    /// [`PackedMatrix::from_rows`] into this allocation.
    pub fn set_rows(&mut self, w: &[f32], ldw: usize, n: usize, k: usize, bias: Option<&[f32]>) {
        assert!(n == 0 || (ldw >= k && w.len() >= (n - 1) * ldw + k));
        self.reset(n, k, bias);
        for j in 0..n {
            let (p, lane) = (j / NR, j % NR);
            let row = &w[j * ldw..j * ldw + k];
            for (line, &v) in self.lines[p * k..(p + 1) * k].iter_mut().zip(row) {
                line.0[lane] = v;
            }
        }
    }

    /// Packs `w` `[k, n]` (row `kk`, stride `ldw`) for `y = x · w`, without bias.
    pub fn set_cols(&mut self, w: &[f32], ldw: usize, k: usize, n: usize) {
        assert!(k == 0 || (ldw >= n && w.len() >= (k - 1) * ldw + n));
        self.reset(n, k, None);
        for p in 0..n.div_ceil(NR) {
            let cols = NR.min(n - p * NR);
            for kk in 0..k {
                let src = &w[kk * ldw + p * NR..kk * ldw + p * NR + cols];
                self.lines[p * k + kk].0[..cols].copy_from_slice(src);
            }
        }
    }

    /// This matrix stored at `precision` (the bias stays f32).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        if self.lines.is_empty() && self.k > 0 {
            return self; // already converted
        }
        match precision {
            Precision::F32 => {}
            Precision::F16 => {
                self.half = self
                    .lines
                    .iter()
                    .map(|l| HalfLine(l.0.map(|v| half::f16::from_f32(v).to_bits())))
                    .collect();
                self.lines = Vec::new();
            }
            Precision::Int8 => {
                let k = self.k;
                self.scale = vec![ZERO_LINE; self.panels()];
                self.quant = vec![QuantLine([0; NR]); self.lines.len()];
                for p in 0..self.panels() {
                    let panel = &self.lines[p * k..(p + 1) * k];
                    for lane in 0..NR {
                        let max = panel.iter().map(|l| l.0[lane].abs()).fold(0f32, f32::max);
                        let scale = max / 127.0;
                        self.scale[p].0[lane] = scale;
                        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                        for (q, l) in self.quant[p * k..(p + 1) * k].iter_mut().zip(panel) {
                            q.0[lane] = (l.0[lane] * inv).round().clamp(-127.0, 127.0) as i8;
                        }
                    }
                }
                self.lines = Vec::new();
            }
        }
        self
    }

    /// The weight `[n, k]` this matrix computes with (after any rounding of its precision):
    /// what the tests compare the kernels against.
    #[cfg(test)]
    fn effective_rows(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut w = vec![0f32; n * k];
        for j in 0..n {
            let (p, lane) = (j / NR, j % NR);
            for kk in 0..k {
                let i = p * k + kk;
                w[j * k + kk] = if !self.half.is_empty() {
                    half::f16::from_bits(self.half[i].0[lane]).to_f32()
                } else if !self.quant.is_empty() {
                    self.quant[i].0[lane] as f32 * self.scale[p].0[lane]
                } else {
                    self.lines[i].0[lane]
                };
            }
        }
        w
    }

    fn reset(&mut self, n: usize, k: usize, bias: Option<&[f32]>) {
        let panels = n.div_ceil(NR);
        (self.k, self.n) = (k, n);
        self.half.clear();
        self.quant.clear();
        self.scale.clear();
        self.lines.clear();
        self.lines.resize(panels * k, ZERO_LINE);
        self.bias.clear();
        self.bias.resize(panels, ZERO_LINE);
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "bias length");
            for (j, &v) in b.iter().enumerate() {
                self.bias[j / NR].0[j % NR] = v;
            }
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    fn panels(&self) -> usize {
        self.bias.len()
    }
}

/// What is done to `acc + bias` before it is stored.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// `c = acc + b`.
    Bias,
    /// `c = gelu(acc + b)` (erf form).
    Gelu,
    /// `c = acc + b + r[i·ldr + j]`.
    Residual { r: &'a [f32], ldr: usize },
}

/// `c[i·ldc + j] = epilogue(Σ_kk a[i·lda + kk] · w[j, kk] + b[j])` for `i < m`, `j < w.n()`:
/// `a` `[m, lda]` (the first `w.k()` columns used), `c` `[m, ldc]`. Uses up to `threads`
/// threads of the current rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    isa: Isa,
    a: &[f32],
    lda: usize,
    m: usize,
    w: &PackedMatrix,
    epi: Epilogue<'_>,
    c: &mut [f32],
    ldc: usize,
    threads: usize,
) {
    let (k, n) = (w.k, w.n);
    if m == 0 || n == 0 {
        return;
    }
    assert!(lda >= k && a.len() >= (m - 1) * lda + k, "a is too short");
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "c is too short");
    if let Epilogue::Residual { r, ldr } = epi {
        assert!(
            ldr >= n && r.len() >= (m - 1) * ldr + n,
            "residual is too short"
        );
    }
    let panels = w.panels();
    let parts = if m * n * k < PARALLEL_MIN_MACS {
        1
    } else {
        threads.clamp(1, panels)
    };
    let out = SharedOut::new(c);
    split_across(0..panels, parts, &|range| {
        // SAFETY: the asserts above bound every index `gemm_panels` touches in `a`, `c` and
        // the residual; `split_across` hands each panel (a disjoint column range of `c`) to
        // exactly one call.
        unsafe { gemm_panels(isa, a, lda, m, w, epi, out.ptr(), ldc, range) }
    });
}

/// Runs `f` on `parts` contiguous pieces of `range` in parallel on the current rayon pool
/// (the calling thread takes the first piece).
pub fn split_across(range: Range<usize>, parts: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
    if parts <= 1 || range.len() <= 1 {
        return f(range);
    }
    let left = parts / 2;
    let mid = range.start + range.len() * left / parts;
    rayon::join(
        || split_across(range.start..mid, left, f),
        || split_across(mid..range.end, parts - left, f),
    );
}

/// A mutable output shared by threads that write disjoint parts of it.
#[derive(Clone, Copy)]
pub struct SharedOut(*mut f32);

// SAFETY: a `SharedOut` only moves a pointer between threads; every writer through it is
// given a disjoint set of elements by its caller.
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub fn new(c: &mut [f32]) -> Self {
        Self(c.as_mut_ptr())
    }

    /// Through a method, so closures capture the whole (Sync) wrapper, not the raw field.
    pub fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// One `mr × NR` output tile (the last panel may have fewer valid columns).
struct Tile {
    a: *const f32,
    lda: usize,
    k: usize,
    /// The panel: `k` lines of `NR` f32, f16 bits or int8, per `storage`.
    b: *const u8,
    storage: Storage,
    /// The panel's column scales (int8 only, else null).
    scale: *const f32,
    bias: *const f32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    gelu: bool,
    /// Prefetch the panel ahead (the first row tile of a pass, which brings it from memory).
    prefetch: bool,
    /// Null without a residual.
    res: *const f32,
    ldr: usize,
}

/// The element type of a panel, as the kernels see it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Storage {
    F32,
    F16,
    Int8,
}

/// # Safety
/// `a` `[m, lda]`, `c` `[m, ldc]` and a residual `[m, ldr]` must be valid for `w.n()` columns
/// (reads) and `c` for writes in the panels of `panels`, which no other thread writes.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_panels(
    isa: Isa,
    a: &[f32],
    lda: usize,
    m: usize,
    w: &PackedMatrix,
    epi: Epilogue<'_>,
    c: *mut f32,
    ldc: usize,
    panels: Range<usize>,
) {
    let k = w.k;
    let chunk = (CHUNK_BYTES / (4 * k.max(1)) / MR * MR).max(MR);
    let (res, ldr) = match epi {
        Epilogue::Residual { r, ldr } => (r.as_ptr(), ldr),
        _ => (std::ptr::null(), 0),
    };
    let gelu = matches!(epi, Epilogue::Gelu);
    let storage = if !w.half.is_empty() {
        Storage::F16
    } else if !w.quant.is_empty() {
        Storage::Int8
    } else {
        Storage::F32
    };
    for r0 in (0..m).step_by(chunk) {
        let rows = chunk.min(m - r0);
        for p in panels.clone() {
            let col = p * NR;
            for i0 in (r0..r0 + rows).step_by(MR) {
                let mr = MR.min(r0 + rows - i0);
                // SAFETY: rows `i0..i0 + mr` < m and columns `col..col + cols` ≤ n lie
                // inside the buffers the caller vouched for.
                let t = unsafe {
                    Tile {
                        a: a.as_ptr().add(i0 * lda),
                        lda,
                        k,
                        b: match storage {
                            Storage::F32 => w.lines.as_ptr().add(p * k).cast(),
                            Storage::F16 => w.half.as_ptr().add(p * k).cast(),
                            Storage::Int8 => w.quant.as_ptr().add(p * k).cast(),
                        },
                        storage,
                        scale: if storage == Storage::Int8 {
                            w.scale.as_ptr().add(p).cast()
                        } else {
                            std::ptr::null()
                        },
                        bias: w.bias.as_ptr().add(p).cast(),
                        c: c.add(i0 * ldc + col),
                        ldc,
                        cols: NR.min(w.n - col),
                        gelu,
                        prefetch: i0 == r0,
                        res: if res.is_null() {
                            res
                        } else {
                            res.add(i0 * ldr + col)
                        },
                        ldr,
                    }
                };
                // SAFETY: `t` points into valid buffers (above); the kernel matching `isa`
                // was detected at run time.
                unsafe { tile(isa, mr, &t) };
            }
        }
    }
}

/// # Safety
/// `t`'s pointers must be valid for `mr` rows; `isa` must be supported by this CPU.
unsafe fn tile(isa: Isa, mr: usize, t: &Tile) {
    macro_rules! by_rows {
        ($f:ident $(, $kind:expr)?) => {
            // SAFETY: forwarded from this function's contract.
            unsafe {
                match mr {
                    1 => $f::<1 $(, {$kind})?>(t),
                    2 => $f::<2 $(, {$kind})?>(t),
                    3 => $f::<3 $(, {$kind})?>(t),
                    4 => $f::<4 $(, {$kind})?>(t),
                    5 => $f::<5 $(, {$kind})?>(t),
                    _ => $f::<6 $(, {$kind})?>(t),
                }
            }
        };
    }
    match (isa, t.storage) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2Fma, Storage::F32) => by_rows!(tile_avx2, KIND_F32),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2Fma, Storage::F16) => by_rows!(tile_avx2, KIND_F16),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2Fma, Storage::Int8) => by_rows!(tile_avx2, KIND_I8),
        _ => by_rows!(tile_portable),
    }
}

/// # Safety
/// `t`'s pointers must be valid for `R` rows.
unsafe fn tile_portable<const R: usize>(t: &Tile) {
    let mut acc = [[0f32; NR]; R];
    for kk in 0..t.k {
        // SAFETY: the panel holds `k` lines of NR values; row `r` of `a` has `k` floats.
        let b: [f32; NR] = unsafe {
            match t.storage {
                Storage::F16 => {
                    (*t.b.cast::<[u16; NR]>().add(kk)).map(|h| half::f16::from_bits(h).to_f32())
                }
                Storage::Int8 => (*t.b.cast::<[i8; NR]>().add(kk)).map(f32::from),
                Storage::F32 => *t.b.cast::<[f32; NR]>().add(kk),
            }
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let x = unsafe { *t.a.add(r * t.lda + kk) };
            for (o, &w) in acc.iter_mut().zip(&b) {
                *o += x * w;
            }
        }
    }
    // SAFETY: the bias (and the scales, when int8) is one line of NR floats.
    let bias = unsafe { &*t.bias.cast::<[f32; NR]>() };
    let scale = if t.scale.is_null() {
        [1.0; NR]
    } else {
        // SAFETY: as above.
        unsafe { *t.scale.cast::<[f32; NR]>() }
    };
    for (r, acc) in acc.iter().enumerate() {
        for j in 0..t.cols {
            let mut v = acc[j] * scale[j] + bias[j];
            if t.gelu {
                v = super::activation::gelu(v);
            }
            if !t.res.is_null() {
                // SAFETY: the residual is valid for `cols` columns of each row.
                v += unsafe { *t.res.add(r * t.ldr + j) };
            }
            // SAFETY: `c` is valid for `cols` columns of each row.
            unsafe { *t.c.add(r * t.ldc + j) = v };
        }
    }
}

const KIND_F32: u8 = 0;
const KIND_F16: u8 = 1;
const KIND_I8: u8 = 2;

/// How far ahead of the current k-step the first row tile of a panel prefetches: the weight
/// stream comes from DRAM (the weights outgrow the caches), and the kernel stalls on it.
const PREFETCH_BYTES: usize = 1024;

/// # Safety
/// `t`'s pointers must be valid for `R` rows, its panel of the element type `KIND` names
/// (`KIND_*`); the CPU must support AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const R: usize, const KIND: u8>(t: &Tile) {
    use std::arch::x86_64::*;

    use super::activation::avx2::gelu;

    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut rows = [std::ptr::null::<f32>(); R];
    for (r, p) in rows.iter_mut().enumerate() {
        // SAFETY: row `r < R` of `a` is valid.
        *p = unsafe { t.a.add(r * t.lda) };
    }
    let line_bytes = match KIND {
        KIND_F16 => 2 * NR,
        KIND_I8 => NR,
        _ => 4 * NR,
    };
    let mut b = t.b;
    for kk in 0..t.k {
        // SAFETY: `b` walks the panel's `k` aligned lines; `rows[r] + kk` stays in row `r`'s
        // `k` floats. A prefetch never faults, so its address may run past the panel.
        unsafe {
            if t.prefetch {
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH_BYTES).cast());
            }
            let (b0, b1) = match KIND {
                KIND_F16 => {
                    let h = b.cast::<__m128i>();
                    (
                        _mm256_cvtph_ps(_mm_load_si128(h)),
                        _mm256_cvtph_ps(_mm_load_si128(h.add(1))),
                    )
                }
                KIND_I8 => {
                    let q = _mm_load_si128(b.cast::<__m128i>());
                    (
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(q, q))),
                    )
                }
                _ => (
                    _mm256_load_ps(b.cast()),
                    _mm256_load_ps(b.cast::<f32>().add(8)),
                ),
            };
            for r in 0..R {
                let x = _mm256_broadcast_ss(&*rows[r].add(kk));
                acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
            }
            b = b.add(line_bytes);
        }
    }
    // SAFETY: the bias is one aligned line; `c` and the residual are valid for `cols` columns
    // of each of the `R` rows, and whole 8-float stores happen only when `cols == NR`.
    unsafe {
        let bias0 = _mm256_load_ps(t.bias);
        let bias1 = _mm256_load_ps(t.bias.add(8));
        let (scale0, scale1) = if KIND == KIND_I8 {
            (_mm256_load_ps(t.scale), _mm256_load_ps(t.scale.add(8)))
        } else {
            (_mm256_set1_ps(1.0), _mm256_set1_ps(1.0))
        };
        for (r, acc) in acc.iter().enumerate() {
            let mut v0 = _mm256_fmadd_ps(acc[0], scale0, bias0);
            let mut v1 = _mm256_fmadd_ps(acc[1], scale1, bias1);
            if t.gelu {
                v0 = gelu(v0);
                v1 = gelu(v1);
            }
            let c = t.c.add(r * t.ldc);
            let res = t.res.wrapping_add(r * t.ldr);
            if t.cols == NR {
                if !t.res.is_null() {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(res));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(res.add(8)));
                }
                _mm256_storeu_ps(c, v0);
                _mm256_storeu_ps(c.add(8), v1);
            } else {
                let mut tmp = [0f32; NR];
                _mm256_storeu_ps(tmp.as_mut_ptr(), v0);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), v1);
                for (j, &v) in tmp[..t.cols].iter().enumerate() {
                    let add = if t.res.is_null() { 0.0 } else { *res.add(j) };
                    *c.add(j) = v + add;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        if Isa::detect() != Isa::Portable {
            v.push(Isa::detect());
        }
        v
    }

    #[test]
    fn packed_gemm_matches_a_naive_triple_loop_on_odd_shapes() {
        let gelu = super::super::activation::gelu;
        let mut cases = 0;
        for &m in &[1usize, 3, 7, 21] {
            for &n in &[1usize, 15, 17, 40, 1152] {
                for &k in &[1usize, 5, 13, 37, 384] {
                    let (lda, ldw, ldc, ldr) = (k + 3, k + 1, n + 2, n + 5);
                    let a = values(m * lda, (m * 1000 + n * 10 + k) as u64);
                    let w32 = values(n * ldw, (n + k) as u64 + 7);
                    let b = values(n, 3);
                    let res = values(m * ldr, 11);
                    for (precision, isa) in [Precision::F32, Precision::F16, Precision::Int8]
                        .into_iter()
                        .flat_map(|p| isas().into_iter().map(move |i| (p, i)))
                    {
                        let packed = PackedMatrix::from_rows(&w32, ldw, n, k, Some(&b))
                            .with_precision(precision);
                        // At f16 and int8 the reference uses the same rounded weights: only
                        // the arithmetic is under test here (the rounding is checked below).
                        let w = packed.effective_rows();
                        let ldw = k;
                        for threads in [1, 2] {
                            for which in 0..3 {
                                let epi = match which {
                                    0 => Epilogue::Bias,
                                    1 => Epilogue::Gelu,
                                    _ => Epilogue::Residual { r: &res, ldr },
                                };
                                let mut c = vec![f32::NAN; m * ldc];
                                gemm(isa, &a, lda, m, &packed, epi, &mut c, ldc, threads);
                                for i in 0..m {
                                    for j in 0..n {
                                        let mut s = b[j] as f64;
                                        let mut mag = b[j].abs() as f64;
                                        for kk in 0..k {
                                            let p = a[i * lda + kk] as f64 * w[j * ldw + kk] as f64;
                                            s += p;
                                            mag += p.abs();
                                        }
                                        let want = match which {
                                            0 => s,
                                            1 => gelu(s as f32) as f64,
                                            _ => s + res[i * ldr + j] as f64,
                                        };
                                        let got = c[i * ldc + j] as f64;
                                        assert!(
                                            (got - want).abs() <= 1e-5 * (1.0 + mag),
                                            "{isa:?} {precision:?} m={m} n={n} k={k} \
                                             epi={which}: \
                                             [{i},{j}] {got} vs {want}"
                                        );
                                    }
                                    // Padding columns of `c` are never written.
                                    assert!(
                                        c[i * ldc + n..i * ldc + ldc].iter().all(|v| v.is_nan())
                                    );
                                }
                                cases += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(cases >= 4 * 5 * 5 * 3 * 2 * 3);
    }

    #[test]
    fn rounded_weights_stay_within_their_precision() {
        let (n, k) = (40, 37);
        let w = values(n * k, 9);
        for (precision, rel) in [
            (Precision::F32, 0.0),
            (Precision::F16, 1.0 / 2048.0),
            (Precision::Int8, 0.5 / 127.0),
        ] {
            let got = PackedMatrix::from_rows(&w, k, n, k, None)
                .with_precision(precision)
                .effective_rows();
            for j in 0..n {
                let row = &w[j * k..(j + 1) * k];
                let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                for kk in 0..k {
                    let err = (got[j * k + kk] - row[kk]).abs();
                    // f16 errs relative to each value, int8 relative to its column's largest.
                    let bound = match precision {
                        Precision::F16 => rel * row[kk].abs(),
                        _ => rel * max * 1.0001,
                    };
                    assert!(err <= bound, "{precision:?} [{j},{kk}]: {err} > {bound}");
                }
            }
        }
    }

    #[test]
    fn column_packing_is_the_transpose_of_row_packing() {
        let (m, k, n) = (7, 21, 33);
        let a = values(m * k, 1);
        let w = values(n * k, 2); // [n, k]
        let mut wt = vec![0f32; k * n]; // [k, n]
        for j in 0..n {
            for kk in 0..k {
                wt[kk * n + j] = w[j * k + kk];
            }
        }
        let rows = PackedMatrix::from_rows(&w, k, n, k, None);
        let mut cols = PackedMatrix::empty();
        cols.set_cols(&wt, n, k, n);
        for isa in isas() {
            let (mut x, mut y) = (vec![0f32; m * n], vec![0f32; m * n]);
            gemm(isa, &a, k, m, &rows, Epilogue::Bias, &mut x, n, 1);
            gemm(isa, &a, k, m, &cols, Epilogue::Bias, &mut y, n, 1);
            assert_eq!(x, y);
        }
    }
}

//! Single-precision GEMM for few rows against a pre-packed weight: `y = x · wᵀ + b` with the
//! bias, GELU or a residual add fused into the store. Built for the encoder of one query
//! (tens of rows against 384..1536-wide weights), where a general GEMM spends its time
//! re-packing the weight and waking threads.
//!
//! The weight is packed once into panels of [`NR`] output columns, each panel `k` cache lines
//! of `NR` floats (k-major), so the micro-kernel streams one line per step of `k` and keeps an
//! [`MR`]`×NR` tile of the output in registers. Output panels are split across the rayon pool.
//!
//! Kernel sets, chosen at run time ([`Isa`]): AVX2 (6 rows × 1 panel per tile), AVX-512 (up to
//! 12 rows × 2 panels, rows copied k-major first), AMX tiles for bf16 weights (2 × 2 tiles of
//! 16 × 16; see `cpu/amx.rs`), and a portable one, which is also the slow reference every other
//! set is tested against (bf16 included: it rounds the activations as the tiles do). This module
//! holds the layout, the packing, the dispatch and the portable kernel; the SIMD tiles live in
//! `cpu/{avx2,avx512,amx}.rs`.

use std::ops::Range;

use crate::Isa;
#[cfg(target_arch = "x86_64")]
use crate::cpu;
use crate::cpu::amx::{K_BLOCK, ROWS as AMX_ROWS};

/// Output columns per panel: two AVX2 registers or one AVX-512 register, one 64-byte line.
pub const NR: usize = 16;
/// Rows per AVX2 register tile (`MR × 2` accumulators + 2 weight registers + 1 broadcast ≤ 16
/// ymm).
pub const MR: usize = 6;
/// Most rows per AVX-512 register tile (`MR_512 × 2` accumulators + 2 weight registers + 1
/// broadcast ≤ 32 zmm). A tile's rows come from a k-major copy of `x`, so the
/// kernel addresses them all from one pointer.
pub(crate) const MR_512: usize = 12;
/// Rows of `x` kept hot per pass over the weight panels (sized to stay in a 512 KiB L2).
pub(crate) const CHUNK_BYTES: usize = 192 << 10;
/// Below this many multiply-adds a product runs on the calling thread: a hand-off costs more.
const PARALLEL_MIN_MACS: usize = 1 << 16;

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

/// A k-pair of a panel stored as bf16 in AMX's "VNNI" order: column `j`'s weights for steps
/// `2i` (low half) and `2i + 1` (high half) in one `u32`; a tile of 16 lines is one `k` block.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct PairLine([u32; NR]);

/// How a packed weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    /// IEEE f16, products and sums still in f32.
    F16,
    /// Symmetric int8 with one scale per output column (`max |w| / 127`); the activations stay
    /// f32 (weight-only quantisation): `Σ x·q` is summed in f32 and scaled once.
    Int8,
    /// bf16 weights, and the activations rounded to bf16 (nearest even) as they enter the
    /// product; products and sums in f32. What AMX tiles compute, at a fraction of the time.
    Bf16,
}

/// `x` rounded to bf16 (nearest even) and widened back, as the bf16 products see it.
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(x)) << 16)
}

/// `x` as bf16 bits, rounded to nearest even (the bits of `half::bf16::from_f32`), written so
/// the compiler vectorises a loop of it (the activations are converted for every product).
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) | 0x0040) as u16 // quiet, sign and payload kept
    } else {
        (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// A `[k] -> [n]` linear map packed for the micro-kernel, with its bias (zero when none).
pub struct PackedMatrix {
    pub(crate) k: usize,
    pub(crate) n: usize,
    /// `panels × k` lines; panel `p`, step `kk` holds `w[p·NR + j, kk]` for `j < NR`, zero
    /// past `n`.
    lines: Vec<Line>,
    /// The same as f16 when stored at [`Precision::F16`] (then `lines` is empty).
    half: Vec<HalfLine>,
    /// The same as int8 when stored at [`Precision::Int8`] (then `lines` is empty), with
    /// `scale` one line per panel.
    quant: Vec<QuantLine>,
    scale: Vec<Line>,
    /// The same as bf16 k-pairs when stored at [`Precision::Bf16`] (then `lines` is empty):
    /// panel `p` holds `k_pad / 2` lines from `p · k_pad / 2`, `k_pad` = `k` rounded up to a
    /// whole AMX block, zero past `k`.
    pairs: Vec<PairLine>,
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
            pairs: Vec::new(),
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
            Precision::Bf16 => {
                let (k, half_pad) = (self.k, self.k_pad() / 2);
                let bits = |l: &Line, lane: usize| u32::from(bf16_bits(l.0[lane]));
                self.pairs = vec![PairLine([0; NR]); self.panels() * half_pad];
                for p in 0..self.panels() {
                    let panel = &self.lines[p * k..(p + 1) * k];
                    let out = &mut self.pairs[p * half_pad..(p + 1) * half_pad];
                    for (pair, steps) in out.iter_mut().zip(panel.chunks(2)) {
                        for lane in 0..NR {
                            let high = steps.get(1).map_or(0, |l| bits(l, lane));
                            pair.0[lane] = bits(&steps[0], lane) | high << 16;
                        }
                    }
                }
                self.lines = Vec::new();
            }
        }
        self
    }

    /// `k` rounded up to whole AMX blocks (the bf16 panels' length in steps).
    pub(crate) fn k_pad(&self) -> usize {
        self.k.div_ceil(K_BLOCK) * K_BLOCK
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
                w[j * k + kk] = if !self.pairs.is_empty() {
                    let pair = self.pairs[p * self.k_pad() / 2 + kk / 2].0[lane];
                    half::bf16::from_bits((pair >> (16 * (kk % 2))) as u16).to_f32()
                } else if !self.half.is_empty() {
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
        self.pairs.clear();
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

    pub(crate) fn panels(&self) -> usize {
        self.bias.len()
    }

    pub(crate) fn storage(&self) -> Storage {
        if !self.pairs.is_empty() {
            Storage::Bf16
        } else if !self.half.is_empty() {
            Storage::F16
        } else if !self.quant.is_empty() {
            Storage::Int8
        } else {
            Storage::F32
        }
    }

    /// The first line of panel `p` (`p < panels`) in `storage`.
    pub(crate) fn panel(&self, p: usize, storage: Storage) -> *const u8 {
        let at = p * self.k;
        match storage {
            Storage::F32 => self.lines[at..].as_ptr().cast(),
            Storage::F16 => self.half[at..].as_ptr().cast(),
            Storage::Int8 => self.quant[at..].as_ptr().cast(),
            Storage::Bf16 => self.pairs[p * self.k_pad() / 2..].as_ptr().cast(),
        }
    }

    /// Panel `p`'s column scales (int8), else null.
    fn scale_line(&self, p: usize, storage: Storage) -> *const f32 {
        if storage == Storage::Int8 {
            self.scale[p].0.as_ptr()
        } else {
            std::ptr::null()
        }
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
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Amx && w.storage() == Storage::Bf16 {
        let packed = pack_bf16(a, lda, m, k, w.k_pad());
        split_across(0..panels, parts, &|range| {
            // SAFETY: as below; `packed` holds `a` as bf16, `m` rounded up to whole tiles of
            // rows, `k_pad` values apart; AMX was granted (`Isa::Amx`).
            unsafe { cpu::amx::gemm_panels(&packed, w.k_pad(), m, w, epi, out.ptr(), ldc, range) }
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx512() && w.storage() != Storage::Bf16 {
        let tiles = RowTiles::new(m, MR_512);
        let packed = tiles.pack(a, lda, k);
        split_across(0..panels, parts, &|range| {
            // SAFETY: as below; `packed` holds every tile of `a`, k-major.
            unsafe { cpu::avx512::gemm_panels(&tiles, &packed, m, w, epi, out.ptr(), ldc, range) }
        });
        return;
    }
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
pub(crate) struct Tile {
    /// Row `r`, step `kk` at `a[r·lda + kk]`; for the AVX-512 kernel a k-major tile instead,
    /// at `a[kk·R + r]`.
    pub(crate) a: *const f32,
    pub(crate) lda: usize,
    pub(crate) k: usize,
    /// The panel: `k` lines of `NR` f32, f16 bits or int8, per `storage`.
    pub(crate) b: *const u8,
    pub(crate) storage: Storage,
    /// The panel's column scales (int8 only, else null).
    pub(crate) scale: *const f32,
    pub(crate) bias: *const f32,
    pub(crate) c: *mut f32,
    pub(crate) ldc: usize,
    pub(crate) cols: usize,
    pub(crate) gelu: bool,
    /// Prefetch the panel ahead (the first row tile of a pass, which brings it from memory).
    pub(crate) prefetch: bool,
    /// Null without a residual.
    pub(crate) res: *const f32,
    pub(crate) ldr: usize,
}

impl Tile {
    /// The tile of output rows from `row0` in panel `p` of `w`: `a` the tile's first input
    /// value (rows `lda` apart, or a k-major copy), `c` `[m, ldc]` the whole output.
    ///
    /// # Safety
    /// `row0 < m`, `p < w.panels()`; `c` and the residual of `epi` must be valid for rows
    /// from `row0` in the panel's columns.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn at(
        a: *const f32,
        lda: usize,
        w: &PackedMatrix,
        p: usize,
        epi: Epilogue<'_>,
        c: *mut f32,
        ldc: usize,
        row0: usize,
        prefetch: bool,
    ) -> Tile {
        let (storage, col) = (w.storage(), p * NR);
        let (res, ldr) = match epi {
            Epilogue::Residual { r, ldr } => (r.as_ptr(), ldr),
            _ => (std::ptr::null(), 0),
        };
        // SAFETY: the caller vouched for row `row0` and column `col` of `c` and the residual.
        unsafe {
            Tile {
                a,
                lda,
                k: w.k,
                b: w.panel(p, storage),
                storage,
                scale: w.scale_line(p, storage),
                bias: w.bias[p].0.as_ptr(),
                c: c.add(row0 * ldc + col),
                ldc,
                cols: NR.min(w.n - col),
                gelu: matches!(epi, Epilogue::Gelu),
                prefetch,
                res: if res.is_null() {
                    res
                } else {
                    res.add(row0 * ldr + col)
                },
                ldr,
            }
        }
    }
}

/// The element type of a panel, as the kernels see it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storage {
    F32,
    F16,
    Int8,
    /// k-pairs of bf16 ([`PairLine`]); the activations are rounded to bf16.
    Bf16,
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
    let chunk = (CHUNK_BYTES / (4 * w.k.max(1)) / MR * MR).max(MR);
    for r0 in (0..m).step_by(chunk) {
        let rows = chunk.min(m - r0);
        for p in panels.clone() {
            for i0 in (r0..r0 + rows).step_by(MR) {
                let mr = MR.min(r0 + rows - i0);
                // SAFETY: rows `i0..i0 + mr` < m and panel `p`'s columns lie inside the
                // buffers the caller vouched for.
                let t = unsafe {
                    Tile::at(
                        a.as_ptr().add(i0 * lda),
                        lda,
                        w,
                        p,
                        epi,
                        c,
                        ldc,
                        i0,
                        i0 == r0,
                    )
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
    #[cfg(target_arch = "x86_64")]
    use cpu::avx2::tile as avx2_tile;
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
        // bf16 off the tiles: the reference the AMX kernel is compared with.
        (_, Storage::Bf16) => by_rows!(tile_portable),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2Fma | Isa::Avx512 | Isa::Amx, Storage::F32) => by_rows!(avx2_tile, KIND_F32),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2Fma | Isa::Avx512 | Isa::Amx, Storage::F16) => by_rows!(avx2_tile, KIND_F16),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2Fma | Isa::Avx512 | Isa::Amx, Storage::Int8) => by_rows!(avx2_tile, KIND_I8),
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
                Storage::Bf16 => (*t.b.cast::<[u32; NR]>().add(kk / 2))
                    .map(|p| half::bf16::from_bits((p >> (16 * (kk % 2))) as u16).to_f32()),
            }
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let x = unsafe { *t.a.add(r * t.lda + kk) };
            let x = if t.storage == Storage::Bf16 {
                round_bf16(x)
            } else {
                x
            };
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
                v = crate::activation::gelu(v);
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

pub(crate) const KIND_F32: u8 = 0;
pub(crate) const KIND_F16: u8 = 1;
pub(crate) const KIND_I8: u8 = 2;

/// How far ahead of the current k-step the first row tile of a panel prefetches: the weight
/// stream comes from DRAM (the weights outgrow the caches), and the kernel stalls on it.
pub(crate) const PREFETCH_BYTES: usize = 1024;

/// How `m` rows are cut into register tiles of at most `max` rows, as evenly as possible (21
/// rows at 12 are 11 + 10, not 12 + 9: the short tile wastes less of each weight load).
pub(crate) struct RowTiles {
    /// Tile `i` holds rows `bounds[i]..bounds[i + 1]`.
    pub(crate) bounds: Vec<usize>,
}

impl RowTiles {
    fn new(m: usize, max: usize) -> Self {
        let tiles = m.div_ceil(max).max(1);
        Self {
            bounds: (0..=tiles).map(|i| i * m / tiles).collect(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.bounds.len() - 1
    }

    pub(crate) fn rows(&self, i: usize) -> Range<usize> {
        self.bounds[i]..self.bounds[i + 1]
    }

    /// `x` `[m, lda]` copied tile by tile, each tile k-major: row `r` of tile `i`, step `kk` at
    /// `bounds[i]·k + kk·rows + r`.
    fn pack(&self, x: &[f32], lda: usize, k: usize) -> Vec<f32> {
        let m = *self.bounds.last().unwrap_or(&0);
        let mut out = Vec::with_capacity(m * k);
        for i in 0..self.len() {
            let rows: Vec<&[f32]> = self
                .rows(i)
                .map(|row| &x[row * lda..row * lda + k])
                .collect();
            // Written in order (no zeroing first); the reads walk the tile's rows side by side.
            for kk in 0..k {
                out.extend(rows.iter().map(|row| row[kk]));
            }
        }
        out
    }
}

/// `a` `[m, lda]` (first `k` columns) as bf16 rows `k_pad` apart, the rows rounded up to whole
/// AMX tiles; zero past `k` and past `m`.
#[cfg(target_arch = "x86_64")]
pub(crate) fn pack_bf16(a: &[f32], lda: usize, m: usize, k: usize, k_pad: usize) -> Vec<u16> {
    let m_pad = m.div_ceil(AMX_ROWS) * AMX_ROWS;
    let mut out = Vec::with_capacity(m_pad * k_pad);
    for i in 0..m {
        out.extend(a[i * lda..i * lda + k].iter().map(|&x| bf16_bits(x)));
        out.resize((i + 1) * k_pad, 0);
    }
    out.resize(m_pad * k_pad, 0);
    out
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
        Isa::available()
    }

    #[test]
    fn packed_gemm_matches_a_naive_triple_loop_on_odd_shapes() {
        let gelu = super::super::activation::gelu;
        let mut cases = 0;
        for &m in &[1usize, 3, 7, 21, 33] {
            for &n in &[1usize, 15, 17, 40, 1152] {
                for &k in &[1usize, 5, 13, 37, 384] {
                    let (lda, ldw, ldc, ldr) = (k + 3, k + 1, n + 2, n + 5);
                    let a = values(m * lda, (m * 1000 + n * 10 + k) as u64);
                    let w32 = values(n * ldw, (n + k) as u64 + 7);
                    let b = values(n, 3);
                    let res = values(m * ldr, 11);
                    let a_bf16: Vec<f32> = a.iter().map(|&x| round_bf16(x)).collect();
                    for (precision, isa) in [
                        Precision::F32,
                        Precision::F16,
                        Precision::Int8,
                        Precision::Bf16,
                    ]
                    .into_iter()
                    .flat_map(|p| isas().into_iter().map(move |i| (p, i)))
                    {
                        let packed = PackedMatrix::from_rows(&w32, ldw, n, k, Some(&b))
                            .with_precision(precision);
                        // At f16 and int8 the reference uses the same rounded weights: only
                        // the arithmetic is under test here (the rounding is checked below).
                        let w = packed.effective_rows();
                        let ldw = k;
                        // bf16 products see the activations rounded, too.
                        let a_eff = if precision == Precision::Bf16 {
                            &a_bf16
                        } else {
                            &a
                        };
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
                                            let p =
                                                a_eff[i * lda + kk] as f64 * w[j * ldw + kk] as f64;
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
        assert!(cases >= 5 * 5 * 5 * 4 * 2 * 3);
    }

    #[test]
    fn rounded_weights_stay_within_their_precision() {
        let (n, k) = (40, 37);
        let w = values(n * k, 9);
        for (precision, rel) in [
            (Precision::F32, 0.0),
            (Precision::F16, 1.0 / 2048.0),
            (Precision::Int8, 0.5 / 127.0),
            (Precision::Bf16, 1.0 / 256.0),
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
                        Precision::F16 | Precision::Bf16 => rel * row[kk].abs(),
                        _ => rel * max * 1.0001,
                    };
                    assert!(err <= bound, "{precision:?} [{j},{kk}]: {err} > {bound}");
                }
            }
        }
    }

    #[test]
    fn bf16_rounding_matches_the_half_crate() {
        let mut specials = vec![
            0.0f32,
            -0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::from_bits(0x3f80_8000), // a tie: rounds to even (down)
            f32::from_bits(0x3f81_8000), // a tie: rounds to even (up)
            f32::from_bits(0x7fc0_1234), // NaN with a payload
            f32::from_bits(0x7f80_0001), // signalling NaN
        ];
        specials.extend(values(100_000, 5).iter().map(|v| v * 1e3));
        specials.extend((0..100_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))));
        for x in specials {
            let want = half::bf16::from_f32(x).to_bits();
            assert_eq!(bf16_bits(x), want, "{x:e} ({:#010x})", x.to_bits());
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

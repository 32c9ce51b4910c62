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
//! 16 × 16; see `amx`), and a portable one, which is also the slow reference every other set is
//! tested against (bf16 included: it rounds the activations as the tiles do).

use std::ops::Range;

/// Output columns per panel: two AVX2 registers or one AVX-512 register, one 64-byte line.
pub const NR: usize = 16;
/// Rows per AVX2 register tile (`MR × 2` accumulators + 2 weight registers + 1 broadcast ≤ 16
/// ymm).
pub const MR: usize = 6;
/// Most rows per AVX-512 register tile (`MR_512 × 2` accumulators + 2 weight registers + 1
/// broadcast ≤ 32 zmm). A tile's rows come from a k-major copy of `x`, so the
/// kernel addresses them all from one pointer.
const MR_512: usize = 12;
/// Rows of `x` kept hot per pass over the weight panels (sized to stay in a 512 KiB L2).
const CHUNK_BYTES: usize = 192 << 10;
/// Below this many multiply-adds a product runs on the calling thread: a hand-off costs more.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// The instruction set the kernels use, chosen once at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// [`Isa::Avx512`] plus AMX tiles with bf16 (granted by the OS): weights stored at
    /// [`Precision::Bf16`] multiply on the tiles, everything else as on AVX-512.
    Amx,
    /// x86-64 with AVX-512F besides AVX2, FMA and F16C: one register holds a panel's line, so a
    /// tile twice as tall costs the same weight loads.
    Avx512,
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
            if is_x86_feature_detected!("avx512f") {
                if super::amx::available() {
                    return Isa::Amx;
                }
                return Isa::Avx512;
            }
            return Isa::Avx2Fma;
        }
        Isa::Portable
    }

    /// Every kernel set this CPU can run, fastest first (the tests compare them all).
    pub fn available() -> Vec<Isa> {
        // Each set can run what the ones after it run.
        let all = [Isa::Amx, Isa::Avx512, Isa::Avx2Fma, Isa::Portable];
        let best = Isa::detect();
        all.into_iter().skip_while(|&i| i != best).collect()
    }

    /// Whether the AVX2 element-wise kernels (softmax, GELU) may run.
    pub fn has_avx2(self) -> bool {
        matches!(self, Isa::Amx | Isa::Avx512 | Isa::Avx2Fma)
    }

    /// Whether the AVX-512 kernels may run.
    fn has_avx512(self) -> bool {
        matches!(self, Isa::Amx | Isa::Avx512)
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
    fn k_pad(&self) -> usize {
        self.k.div_ceil(super::amx::K_BLOCK) * super::amx::K_BLOCK
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

    fn panels(&self) -> usize {
        self.bias.len()
    }

    fn storage(&self) -> Storage {
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
    fn panel(&self, p: usize, storage: Storage) -> *const u8 {
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
            unsafe { gemm_panels_amx(&packed, w.k_pad(), m, w, epi, out.ptr(), ldc, range) }
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx512() && w.storage() != Storage::Bf16 {
        let tiles = RowTiles::new(m, MR_512);
        let packed = tiles.pack(a, lda, k);
        split_across(0..panels, parts, &|range| {
            // SAFETY: as below; `packed` holds every tile of `a`, k-major.
            unsafe { gemm_panels_avx512(&tiles, &packed, m, w, epi, out.ptr(), ldc, range) }
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
struct Tile {
    /// Row `r`, step `kk` at `a[r·lda + kk]`; for the AVX-512 kernel a k-major tile instead,
    /// at `a[kk·R + r]`.
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

impl Tile {
    /// The tile of output rows from `row0` in panel `p` of `w`: `a` the tile's first input
    /// value (rows `lda` apart, or a k-major copy), `c` `[m, ldc]` the whole output.
    ///
    /// # Safety
    /// `row0 < m`, `p < w.panels()`; `c` and the residual of `epi` must be valid for rows
    /// from `row0` in the panel's columns.
    #[allow(clippy::too_many_arguments)]
    unsafe fn at(
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
enum Storage {
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
        (Isa::Avx2Fma | Isa::Avx512 | Isa::Amx, Storage::F32) => by_rows!(tile_avx2, KIND_F32),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2Fma | Isa::Avx512 | Isa::Amx, Storage::F16) => by_rows!(tile_avx2, KIND_F16),
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2Fma | Isa::Avx512 | Isa::Amx, Storage::Int8) => by_rows!(tile_avx2, KIND_I8),
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
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: forwarded from this function's contract.
        unsafe { store_row_avx2::<KIND>(t, r, acc[0], acc[1]) };
    }
}

/// The epilogue of row `r` of a tile: `acc · scale + bias` (columns `0..8` in `acc0`, `8..16`
/// in `acc1`), GELU, the residual, then the store.
///
/// # Safety
/// The bias (and the scales, int8) is one aligned line; `c` and the residual are valid for
/// `cols` columns of row `r`; the CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn store_row_avx2<const KIND: u8>(
    t: &Tile,
    r: usize,
    acc0: std::arch::x86_64::__m256,
    acc1: std::arch::x86_64::__m256,
) {
    use std::arch::x86_64::*;

    use super::activation::avx2::gelu;

    // SAFETY: whole 8-float stores happen only when `cols == NR`; the rest is the contract.
    unsafe {
        let bias0 = _mm256_load_ps(t.bias);
        let bias1 = _mm256_load_ps(t.bias.add(8));
        let (scale0, scale1) = if KIND == KIND_I8 {
            (_mm256_load_ps(t.scale), _mm256_load_ps(t.scale.add(8)))
        } else {
            (_mm256_set1_ps(1.0), _mm256_set1_ps(1.0))
        };
        let mut v0 = _mm256_fmadd_ps(acc0, scale0, bias0);
        let mut v1 = _mm256_fmadd_ps(acc1, scale1, bias1);
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

/// How `m` rows are cut into register tiles of at most `max` rows, as evenly as possible (21
/// rows at 12 are 11 + 10, not 12 + 9: the short tile wastes less of each weight load).
struct RowTiles {
    /// Tile `i` holds rows `bounds[i]..bounds[i + 1]`.
    bounds: Vec<usize>,
}

impl RowTiles {
    fn new(m: usize, max: usize) -> Self {
        let tiles = m.div_ceil(max).max(1);
        Self {
            bounds: (0..=tiles).map(|i| i * m / tiles).collect(),
        }
    }

    fn len(&self) -> usize {
        self.bounds.len() - 1
    }

    fn rows(&self, i: usize) -> Range<usize> {
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
fn pack_bf16(a: &[f32], lda: usize, m: usize, k: usize, k_pad: usize) -> Vec<u16> {
    let m_pad = m.div_ceil(super::amx::ROWS) * super::amx::ROWS;
    let mut out = Vec::with_capacity(m_pad * k_pad);
    for i in 0..m {
        out.extend(a[i * lda..i * lda + k].iter().map(|&x| bf16_bits(x)));
        out.resize((i + 1) * k_pad, 0);
    }
    out.resize(m_pad * k_pad, 0);
    out
}

/// [`gemm_panels`] on AMX tiles for a [`Precision::Bf16`] weight: each step of the k loop
/// loads two row tiles of `a` and two panels of `w` and does four tile products (2 × 2 output
/// tiles of 16 × 16); the output tiles go through a buffer to the AVX2 epilogue.
///
/// # Safety
/// As [`gemm_panels`]'s, with `a` from [`pack_bf16`] (`lda` bf16 values per row, whole row
/// tiles); AMX must be granted ([`Isa::Amx`]).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn gemm_panels_amx(
    a: &[u16],
    lda: usize,
    m: usize,
    w: &PackedMatrix,
    epi: Epilogue<'_>,
    c: *mut f32,
    ldc: usize,
    panels: Range<usize>,
) {
    use super::amx::{K_BLOCK, ROW_BYTES, ROWS, tile};
    use std::arch::x86_64::*;

    let row_tiles = m.div_ceil(ROWS);
    let blocks = w.k_pad() / K_BLOCK;
    let (a_stride, b_stride) = (2 * lda, ROW_BYTES);
    debug_assert!(a.len() >= row_tiles * ROWS * lda && lda == w.k_pad());
    #[repr(C, align(64))]
    struct Out([[f32; NR]; ROWS]);
    let mut out = Out([[0.0; NR]; ROWS]);
    // SAFETY: `Isa::Amx` means the tiles were granted; every pointer below stays inside `a`
    // (whole row tiles of `lda` values) or a panel (`k_pad / 2` lines of 64 bytes).
    unsafe {
        tile::configure();
        let mut p = panels.start;
        while p < panels.end {
            let two_panels = p + 1 < panels.end;
            let b0 = w.panel(p, Storage::Bf16);
            let b1 = if two_panels {
                w.panel(p + 1, Storage::Bf16)
            } else {
                b0
            };
            let mut rt = 0;
            while rt < row_tiles {
                let two_rows = rt + 1 < row_tiles;
                let a0 = a.as_ptr().add(rt * ROWS * lda).cast::<u8>();
                let a1 = if two_rows {
                    a0.add(ROWS * a_stride)
                } else {
                    a0
                };
                tile::zero::<0>();
                tile::zero::<1>();
                tile::zero::<2>();
                tile::zero::<3>();
                for kb in 0..blocks {
                    // Tiles 4, 5: the row tiles' k block; 6, 7: the panels' (16 k-pairs each).
                    tile::load::<4>(a0.add(kb * 2 * K_BLOCK), a_stride);
                    tile::load::<6>(b0.add(kb * ROWS * ROW_BYTES), b_stride);
                    tile::dot::<0, 4, 6>();
                    if two_panels {
                        tile::load::<7>(b1.add(kb * ROWS * ROW_BYTES), b_stride);
                        tile::dot::<1, 4, 7>();
                    }
                    if two_rows {
                        tile::load::<5>(a1.add(kb * 2 * K_BLOCK), a_stride);
                        tile::dot::<2, 5, 6>();
                        if two_panels {
                            tile::dot::<3, 5, 7>();
                        }
                    }
                }
                for (acc, row_tile, panel) in [
                    (0, rt, p),
                    (1, rt, p + 1),
                    (2, rt + 1, p),
                    (3, rt + 1, p + 1),
                ] {
                    if row_tile >= row_tiles || panel >= panels.end {
                        continue;
                    }
                    let dst = out.0.as_mut_ptr().cast::<u8>();
                    match acc {
                        0 => tile::store::<0>(dst, ROW_BYTES),
                        1 => tile::store::<1>(dst, ROW_BYTES),
                        2 => tile::store::<2>(dst, ROW_BYTES),
                        _ => tile::store::<3>(dst, ROW_BYTES),
                    }
                    let row0 = row_tile * ROWS;
                    // Only the epilogue reads this tile: no input rows.
                    let t = Tile::at(std::ptr::null(), 0, w, panel, epi, c, ldc, row0, false);
                    for (r, row) in out.0.iter().enumerate().take(ROWS.min(m - row0)) {
                        let lo = _mm256_loadu_ps(row.as_ptr());
                        let hi = _mm256_loadu_ps(row.as_ptr().add(8));
                        store_row_avx2::<KIND_F16>(&t, r, lo, hi);
                    }
                }
                rt += 2;
            }
            p += 2;
        }
        tile::release();
    }
}

/// [`gemm_panels`] on the AVX-512 kernels, over `tiles` of `a` packed by [`RowTiles::pack`].
///
/// # Safety
/// As [`gemm_panels`]'s; the CPU must support AVX-512F, AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_panels_avx512(
    tiles: &RowTiles,
    packed: &[f32],
    m: usize,
    w: &PackedMatrix,
    epi: Epilogue<'_>,
    c: *mut f32,
    ldc: usize,
    panels: Range<usize>,
) {
    let k = w.k;
    let tile = |i: usize, p: usize, prefetch: bool| -> Tile {
        let rows = tiles.rows(i);
        debug_assert!(rows.end <= m && p < w.panels());
        // SAFETY: rows `rows` < m and panel `p`'s columns lie inside the buffers the caller
        // vouched for; the tile's packed rows are `rows.len() × k`.
        unsafe {
            let a = packed.as_ptr().add(rows.start * k);
            Tile::at(a, rows.len(), w, p, epi, c, ldc, rows.start, prefetch)
        }
    };
    // Tiles are taken in groups whose rows stay hot in L2 across all the panels.
    let chunk_rows = (CHUNK_BYTES / (4 * k.max(1))).max(MR_512);
    let mut first = 0;
    while first < tiles.len() {
        let mut last = first + 1;
        while last < tiles.len() && tiles.bounds[last + 1] - tiles.bounds[first] <= chunk_rows {
            last += 1;
        }
        for p in panels.clone().step_by(2) {
            for i in first..last {
                let t = tile(i, p, i == first);
                let mr = tiles.rows(i).len();
                // SAFETY: the tiles point into valid buffers (above); the caller detected
                // AVX-512.
                unsafe {
                    if p + 1 < panels.end {
                        tile_avx512(mr, &t, Some(&tile(i, p + 1, i == first)));
                    } else {
                        tile_avx512(mr, &t, None);
                    }
                }
            }
        }
        first = last;
    }
}

/// # Safety
/// `t`'s (and `t1`'s) pointers must be valid for `mr ≤ MR_512` rows, `t.a` a k-major tile; the
/// CPU must support AVX-512F, AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_avx512(mr: usize, t: &Tile, t1: Option<&Tile>) {
    macro_rules! by_rows {
        ($kind:expr, $pair:expr, $t1:expr) => {
            // SAFETY: forwarded from this function's contract.
            unsafe {
                match mr {
                    1 => tile_avx512_rows::<1, { $kind }, $pair>(t, $t1),
                    2 => tile_avx512_rows::<2, { $kind }, $pair>(t, $t1),
                    3 => tile_avx512_rows::<3, { $kind }, $pair>(t, $t1),
                    4 => tile_avx512_rows::<4, { $kind }, $pair>(t, $t1),
                    5 => tile_avx512_rows::<5, { $kind }, $pair>(t, $t1),
                    6 => tile_avx512_rows::<6, { $kind }, $pair>(t, $t1),
                    7 => tile_avx512_rows::<7, { $kind }, $pair>(t, $t1),
                    8 => tile_avx512_rows::<8, { $kind }, $pair>(t, $t1),
                    9 => tile_avx512_rows::<9, { $kind }, $pair>(t, $t1),
                    10 => tile_avx512_rows::<10, { $kind }, $pair>(t, $t1),
                    11 => tile_avx512_rows::<11, { $kind }, $pair>(t, $t1),
                    _ => tile_avx512_rows::<MR_512, { $kind }, $pair>(t, $t1),
                }
            }
        };
    }
    match (t.storage, t1) {
        (Storage::F32, Some(t1)) => by_rows!(KIND_F32, 2, t1),
        (Storage::F16, Some(t1)) => by_rows!(KIND_F16, 2, t1),
        (Storage::Int8, Some(t1)) => by_rows!(KIND_I8, 2, t1),
        (Storage::F32, None) => by_rows!(KIND_F32, 1, t),
        (Storage::F16, None) => by_rows!(KIND_F16, 1, t),
        (Storage::Int8, None) => by_rows!(KIND_I8, 1, t),
        (Storage::Bf16, _) => unreachable!("bf16 panels run on the tiles or the portable kernel"),
    }
}

/// One `R × P·NR` tile over `P` (1 or 2) adjacent panels, `t` and `t1` (the same rows; `t1` is
/// ignored when `P` is 1), one zmm accumulator per row and panel. Each row's value is broadcast
/// once per step for both panels: with one FMA per broadcast the kernel is bound by the loads.
/// Same products and the same order of sums as [`tile_avx2`], so both give the same bits.
///
/// # Safety
/// As [`tile_avx512`]'s, with `R` rows and panels of the element type `KIND` names.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn tile_avx512_rows<const R: usize, const KIND: u8, const P: usize>(t: &Tile, t1: &Tile) {
    use std::arch::x86_64::*;

    // Two flat arrays, not `[[_; P]; R]`: LLVM keeps these in registers.
    let mut acc0 = [_mm512_setzero_ps(); R];
    let mut acc1 = [_mm512_setzero_ps(); R];
    let line_bytes = match KIND {
        KIND_F16 => 2 * NR,
        KIND_I8 => NR,
        _ => 4 * NR,
    };
    let load = |b: *const u8| -> __m512 {
        // SAFETY: `b` is one aligned line of the panel (the caller's loop bounds it).
        unsafe {
            match KIND {
                KIND_F16 => _mm512_cvtph_ps(_mm256_load_si256(b.cast())),
                KIND_I8 => _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(b.cast()))),
                _ => _mm512_load_ps(b.cast()),
            }
        }
    };
    let (mut b0, mut b1, mut a) = (t.b, t1.b, t.a);
    for _ in 0..t.k {
        // SAFETY: `b0` and `b1` walk their panels' `k` aligned lines and `a` the tile's `k`
        // steps of `R` floats. A prefetch never faults, so its address may run past the panel.
        unsafe {
            if t.prefetch {
                _mm_prefetch::<_MM_HINT_T0>(b0.wrapping_add(PREFETCH_BYTES).cast());
                if P == 2 {
                    _mm_prefetch::<_MM_HINT_T0>(b1.wrapping_add(PREFETCH_BYTES).cast());
                }
            }
            let w0 = load(b0);
            let w1 = if P == 2 { load(b1) } else { w0 };
            for r in 0..R {
                let x = _mm512_set1_ps(*a.add(r));
                acc0[r] = _mm512_fmadd_ps(x, w0, acc0[r]);
                if P == 2 {
                    acc1[r] = _mm512_fmadd_ps(x, w1, acc1[r]);
                }
            }
            b0 = b0.add(line_bytes);
            b1 = b1.add(line_bytes);
            a = a.add(R);
        }
    }
    let halves = |v: __m512| {
        (
            _mm512_castps512_ps256(v),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
        )
    };
    for r in 0..R {
        let (lo, hi) = halves(acc0[r]);
        // SAFETY: forwarded from this function's contract.
        unsafe { store_row_avx2::<KIND>(t, r, lo, hi) };
        if P == 2 {
            let (lo, hi) = halves(acc1[r]);
            // SAFETY: as above.
            unsafe { store_row_avx2::<KIND>(t1, r, lo, hi) };
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

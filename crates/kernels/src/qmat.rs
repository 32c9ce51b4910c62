//! Quantized weight matrices multiplied on their stored GGUF types with 8-bit activations.
//!
//! A [`QMatrix`] holds a `[n, k]` weight (GGUF blocks along `k`) repacked once, at load, into
//! panels of [`PANEL`] output columns: for every group of [`GROUP`] values along `k`, the
//! quantized values of the panel's 16 columns interleaved four at a time (one 64-byte register
//! holds 4 consecutive `k` of 16 columns, what `vpdpbusd` multiplies), then the group's scales
//! (and offsets) of the 16 columns. Every block type becomes the same form, `w = s·u + o` with
//! unsigned quants `u` (4, 5, 6 or 8 bits, stored as a nibble plane plus bit planes) and `s`,
//! `o` per 32 values (per 16 for Q6_K, Q3_K and Q2_K), so one kernel per bit width serves all
//! of them. Q4_0 .. Q8_0 store `s` (and `o`) as f16 in the group, as the file does. The
//! k-quants keep the file's two levels: an i8 sub-scale `sc` (and sub-min `m`) per column in
//! the group, and before every block of [`SUPER`] values a header with the f16 super-scale `d`
//! (and the negated super-min `-dmin`) of each column; the kernels form `s = d·sc` and
//! `o = -dmin·m` (or `-zero·s`), products exact in f32, so the values are ggml's to the bit.
//! The bytes are the file's, or for Q4_K and Q5_K 1/8 bit per weight more (8-bit instead of
//! 6-bit sub-scales and mins); Q3_K and Q2_K take a nibble per quant (see
//! [`QType::packed_bits`]).
//!
//! Activations are quantized per row and group of 32 to int8 with an f32 scale ([`QActs`]), as
//! llama.cpp's Q8 activations are: the product of a group is an exact integer sum
//! `Σ u·q`, scaled by `s·dx` and offset by `o·dx·Σq`. The error against the f32 product of the
//! dequantized weights is that of rounding the activations (at most `dx/2` per value);
//! [`QActs::error_bound`] states it and the tests hold every set to it.
//!
//! Decode (1-8 rows) and prefill (many rows) are one tiled kernel: a panel's group is unpacked
//! into registers once and multiplied with up to [`MR`] rows; prefill walks the rows in tiles of
//! [`MR`] over each panel while the panel stays in L1/L2. The kernel sets: AVX-512 VNNI
//! (`vpdpbusd`, one zmm per line), AVX2 (`vpmaddubsw` + `vpmaddwd`, a line as two ymm halves;
//! the same integer sums and scale operations, so the same bits) and the portable reference.

use crate::Isa;

/// Output columns per panel (the 16 f32 lanes of a zmm register).
pub const PANEL: usize = 16;
/// Values along `k` per group (one activation scale).
pub const GROUP: usize = 32;
/// Activation rows multiplied per pass over a panel.
pub const MR: usize = 8;
/// How far ahead of the group being multiplied the kernels prefetch the panel stream. From
/// about 4 rows a group's work (4 rows × 8 `vpdpbusd` and more) fills the out-of-order window,
/// so only a group or two of loads are in flight and the hardware prefetcher alone left an
/// 8-row pass over a DRAM-sized matrix latency-bound at ~5 GB/s, half the kernel's speed on
/// cached panels; a few KB ahead brings it to that speed. Below 4 rows the loop is short
/// enough for the loads to overlap by themselves, and the prefetches only cost issue slots
/// (~7% at one row on cached panels).
const PREFETCH_BYTES: usize = 4096;
/// Fewest rows of a tile that prefetch (see [`PREFETCH_BYTES`]).
const PREFETCH_ROWS: usize = 4;

/// The GGUF block types a [`QMatrix`] is packed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QMatError {
    #[error("quantized matrix [{n}, {k}]: k must be a multiple of {block} for {qtype:?}")]
    Columns {
        qtype: QType,
        n: usize,
        k: usize,
        block: usize,
    },
    #[error("quantized matrix [{n}, {k}] of {qtype:?}: {got} bytes, expected {want}")]
    Bytes {
        qtype: QType,
        n: usize,
        k: usize,
        got: usize,
        want: usize,
    },
}

/// How a type is laid out in the panels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Scheme {
    /// Bits per quant: 4 (nibble plane), 5 or 6 (nibble plane and 1 or 2 bit planes), 8 (bytes).
    pub(crate) bits: u8,
    /// Scales (and offsets) per 16 values instead of per 32.
    pub(crate) halves: bool,
    /// `o = -zero·s` for symmetric types, whose offsets are therefore not stored.
    pub(crate) zero: Option<u8>,
    /// The k-quants' two levels: i8 scales (and mins) in the groups under an f16 super-scale
    /// (and negated super-min) per column and [`SUPER`] values, in a header before each block's
    /// groups. Else f16 scales (and offsets) in the groups.
    pub(crate) supers: bool,
}

/// Values along `k` under one super-scale (a k-quant block).
pub const SUPER: usize = 256;

impl QType {
    /// Values per GGUF block.
    pub fn block_values(self) -> usize {
        match self {
            QType::Q4_0 | QType::Q4_1 | QType::Q5_0 | QType::Q5_1 | QType::Q8_0 => 32,
            _ => 256,
        }
    }

    /// Bytes per GGUF block.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q5_0 => 22,
            QType::Q5_1 => 24,
            QType::Q8_0 => 34,
            QType::Q2K => 84,
            QType::Q3K => 110,
            QType::Q4K => 144,
            QType::Q5K => 176,
            QType::Q6K => 210,
        }
    }

    fn scheme(self) -> Scheme {
        let s = |bits, halves, zero, supers| Scheme {
            bits,
            halves,
            zero,
            supers,
        };
        match self {
            QType::Q4_0 => s(4, false, Some(8), false),
            QType::Q4_1 => s(4, false, None, false),
            QType::Q4K => s(4, false, None, true),
            QType::Q5_0 => s(5, false, Some(16), false),
            QType::Q5_1 => s(5, false, None, false),
            QType::Q5K => s(5, false, None, true),
            QType::Q8_0 => s(8, false, Some(128), false),
            QType::Q6K => s(6, true, Some(32), true),
            QType::Q3K => s(4, true, Some(4), true),
            QType::Q2K => s(4, true, None, true),
        }
    }

    /// Bits per weight once packed: the file's for Q4_0 4.5, Q4_1 5, Q5_0 5.5, Q5_1 6, Q8_0 8.5
    /// and Q6_K 6.5625; Q4_K 4.625 for 4.5 and Q5_K 5.625 for 5.5 (8-bit instead of 6-bit
    /// scales and mins); Q3_K 4.5625 for 3.4375 and Q2_K 5.125 for 2.625 (their quants take a
    /// nibble).
    pub fn packed_bits(self) -> f64 {
        let sc = self.scheme();
        let bytes = sc.group_bytes() as f64 + sc.super_bytes() as f64 / (SUPER / GROUP) as f64;
        bytes * 8.0 / (PANEL * GROUP) as f64
    }
}

impl Scheme {
    fn quant_bytes(self) -> usize {
        match self.bits {
            4 => 256,
            5 => 256 + 64,
            6 => 256 + 128,
            _ => 512,
        }
    }
    /// Bytes of one group's scales (or offsets): one f16, or i8 under super-scales, per column
    /// and scale group.
    fn scale_bytes(self) -> usize {
        PANEL * if self.supers { 1 } else { 2 } * if self.halves { 2 } else { 1 }
    }
    pub(crate) fn group_bytes(self) -> usize {
        self.quant_bytes() + self.scale_bytes() * if self.zero.is_some() { 1 } else { 2 }
    }
    /// Bytes of a block's header: f16 super-scales (and negated super-mins) of the columns.
    pub(crate) fn super_bytes(self) -> usize {
        match (self.supers, self.zero) {
            (false, _) => 0,
            (true, Some(_)) => PANEL * 2,
            (true, None) => PANEL * 4,
        }
    }
    /// Groups per header (1 without one).
    fn block_groups(self) -> usize {
        if self.supers { SUPER / GROUP } else { 1 }
    }
    /// Offset in a panel of the header of group `g`'s block (of `g` itself without headers).
    fn header_at(self, g: usize) -> usize {
        let bg = self.block_groups();
        g / bg * (self.super_bytes() + bg * self.group_bytes())
    }
    /// Offset of group `g` in a panel: the blocks' headers come before their groups.
    fn group_at(self, g: usize) -> usize {
        self.header_at(g) + self.super_bytes() + g % self.block_groups() * self.group_bytes()
    }
    fn panel_bytes(self, k: usize) -> usize {
        k / GROUP * self.group_bytes() + k / GROUP / self.block_groups() * self.super_bytes()
    }
}

/// A `[n, k]` weight matrix packed into panels (see the module docs).
pub struct QMatrix {
    qtype: QType,
    n: usize,
    k: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({:?}, [{}, {}])", self.qtype, self.n, self.k)
    }
}

impl QMatrix {
    /// Packs `n` rows of `k` values stored as GGUF blocks of `qtype` (`bytes`, row after row).
    pub fn pack(qtype: QType, bytes: &[u8], n: usize, k: usize) -> Result<Self, QMatError> {
        let block = qtype.block_values();
        if k == 0 || !k.is_multiple_of(block) {
            return Err(QMatError::Columns { qtype, n, k, block });
        }
        let row_bytes = k / block * qtype.block_bytes();
        if bytes.len() != n * row_bytes {
            return Err(QMatError::Bytes {
                qtype,
                n,
                k,
                got: bytes.len(),
                want: n * row_bytes,
            });
        }
        let sc = qtype.scheme();
        let groups = k / GROUP;
        let panels = n.div_ceil(PANEL);
        let (gb, sb, pb) = (sc.group_bytes(), sc.super_bytes(), sc.panel_bytes(k));
        let mut data = vec![0u8; panels * pb];
        let mut u = vec![0u8; PANEL * k];
        let mut s = vec![0f32; PANEL * k / 16];
        let mut o = vec![0f32; PANEL * k / 16];
        // The k-quants' levels: per column, one `KLevels` per block.
        let mut levels = vec![KLevels::default(); PANEL * k / block];
        for p in 0..panels {
            u.fill(0);
            s.fill(0.0);
            o.fill(0.0);
            levels.fill(KLevels::default());
            for c in 0..PANEL.min(n - p * PANEL) {
                let row = &bytes[(p * PANEL + c) * row_bytes..][..row_bytes];
                for (b, blk) in row.chunks_exact(qtype.block_bytes()).enumerate() {
                    let at = b * block;
                    decode_block(
                        qtype,
                        blk,
                        &mut u[c * k + at..][..block],
                        &mut s[(c * k + at) / 16..][..block / 16],
                        &mut o[(c * k + at) / 16..][..block / 16],
                    );
                    if sc.supers {
                        levels[c * k / block + b] = k_levels(qtype, blk);
                    }
                }
            }
            let panel = &mut data[p * pb..][..pb];
            for g in 0..groups {
                let at = sc.group_at(g);
                write_group(sc, g, k, &u, &s, &o, &levels, &mut panel[at..][..gb]);
                if sc.supers && g % sc.block_groups() == 0 {
                    let header = &mut panel[sc.header_at(g)..][..sb];
                    for c in 0..PANEL {
                        let l = &levels[c * k / SUPER + g * GROUP / SUPER];
                        let d = half::f16::from_f32(l.d).to_le_bytes();
                        header[2 * c..][..2].copy_from_slice(&d);
                        if sc.zero.is_none() {
                            let m = half::f16::from_f32(-l.dmin).to_le_bytes();
                            header[2 * (PANEL + c)..][..2].copy_from_slice(&m);
                        }
                    }
                }
            }
        }
        Ok(Self { qtype, n, k, data })
    }

    /// Quantizes `[n, k]` f32 values to Q8_0 blocks as ggml does (`d = max|v| / 127` in f16,
    /// `q = round(v / d)`) and packs them: small f32 matrices (a LoRA mixture's stacked `A`
    /// factors) multiplied in the same pass as the base weights.
    pub fn quantize_q8_0(values: &[f32], n: usize, k: usize) -> Result<Self, QMatError> {
        let block = QType::Q8_0.block_values();
        assert_eq!(
            values.len(),
            n * k,
            "qmat: {} values for {n} x {k}",
            values.len()
        );
        if k == 0 || !k.is_multiple_of(block) {
            return Err(QMatError::Columns {
                qtype: QType::Q8_0,
                n,
                k,
                block,
            });
        }
        let mut bytes = Vec::with_capacity(n * k / block * QType::Q8_0.block_bytes());
        for xs in values.chunks_exact(block) {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            bytes.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
            bytes.extend(xs.iter().map(|&v| (v * inv).round() as i8 as u8));
        }
        Self::pack(QType::Q8_0, &bytes, n, k)
    }

    pub fn qtype(&self) -> QType {
        self.qtype
    }

    /// Output features (weight rows).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features (values per weight row).
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn panel(&self, p: usize) -> &[u8] {
        let pb = self.qtype.scheme().panel_bytes(self.k);
        &self.data[p * pb..][..pb]
    }

    /// Weight row `i` (`k` values) as f32, as the packed form holds it.
    pub fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        assert!(
            i < self.n && out.len() == self.k,
            "qmat: row {i} of {self:?}"
        );
        let sc = self.qtype.scheme();
        let (p, c) = (i / PANEL, i % PANEL);
        let panel = self.panel(p);
        let gb = sc.group_bytes();
        for g in 0..self.k / GROUP {
            let grp = &panel[sc.group_at(g)..][..gb];
            for j in 0..GROUP {
                let h = usize::from(sc.halves && j >= 16);
                let (s, o) = group_scale(sc, panel, g, h, c);
                out[g * GROUP + j] = s * f32::from(read_quant(sc, grp, c, j)) + o;
            }
        }
    }

    /// All weights as f32 `[n, k]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        for (i, row) in out.chunks_exact_mut(self.k).enumerate() {
            self.dequantize_row(i, row);
        }
        out
    }

    /// Whether `isa` has a SIMD kernel for this matrix (else [`QMatrix::matmul`] runs the
    /// portable reference, much slower than candle's kernels). The AVX2 set counts: about 60%
    /// of the VNNI set's speed for 4-bit types (40% for Q8_0) and as memory-bound at one row.
    pub fn has_fast_kernel(isa: Isa) -> bool {
        isa.has_avx2()
    }

    /// `y = x Wᵀ` for the `m` rows of `acts` (`[m, k]`, quantized): `y` `[m, n]` row-major,
    /// overwritten. The panels are split over the rayon pool.
    pub fn matmul(&self, isa: Isa, acts: &QActs, y: &mut [f32]) {
        Self::matmul_many(isa, &mut [(self, y)], acts)
    }

    /// [`QMatrix::matmul`] of several weights sharing `k` against the same activations (q, k
    /// and v; gate and up), in one split over the threads: one hand-off instead of one per
    /// weight. `parts[i].1` receives `[m, parts[i].0.rows()]`.
    pub fn matmul_many(isa: Isa, parts: &mut [(&QMatrix, &mut [f32])], acts: &QActs) {
        let m = acts.m;
        for (w, y) in parts.iter() {
            assert!(
                acts.k == w.k && y.len() == m * w.n,
                "qmat: {m} x {} activations into {} outputs for {w:?}",
                acts.k,
                y.len()
            );
        }
        let counts: Vec<usize> = parts.iter().map(|(w, _)| w.n.div_ceil(PANEL)).collect();
        let panels: usize = counts.iter().sum();
        if m == 0 || panels == 0 {
            return;
        }
        // Tasks of at least ~64K multiply-adds, at most 8 per thread (load balance when the
        // other core is busy); one thread runs inline.
        let threads = rayon::current_num_threads().max(1);
        let tasks = if threads == 1 {
            1
        } else {
            (m * panels * PANEL * acts.k / (64 * 1024))
                .clamp(1, threads * 8)
                .min(panels)
        };
        let per = panels.div_ceil(tasks);
        let outs: Vec<(&QMatrix, OutPtr)> = parts
            .iter_mut()
            .map(|(w, y)| (*w, OutPtr(y.as_mut_ptr())))
            .collect();
        let run = |t: usize| {
            // Global panel range of this task, cut at the weights' boundaries.
            let (mut lo, hi) = (t * per, ((t + 1) * per).min(panels));
            let mut base = 0;
            for ((w, out), &c) in outs.iter().zip(&counts) {
                if lo < hi && lo < base + c {
                    let end = hi.min(base + c);
                    // SAFETY: task `t` writes only the columns of its panels of each weight,
                    // disjoint from every other task's, inside that weight's output (`m * n`
                    // values, asserted above).
                    unsafe { w.panels(isa, acts, lo - base..end - base, *out) };
                    lo = end;
                }
                base += c;
            }
        };
        if tasks == 1 {
            run(0);
        } else {
            use rayon::prelude::*;
            (0..tasks).into_par_iter().for_each(run);
        }
    }

    /// # Safety
    /// `y.0` points at `m * n` f32 values; no other thread writes the columns of `panels`.
    unsafe fn panels(&self, isa: Isa, acts: &QActs, panels: std::ops::Range<usize>, y: OutPtr) {
        let (m, n) = (acts.m, self.n);
        let mut tile = [[0f32; PANEL]; MR];
        for p in panels {
            let panel = self.panel(p);
            let cols = PANEL.min(n - p * PANEL);
            for r0 in (0..m).step_by(MR) {
                let rows = MR.min(m - r0);
                // The first row tile streams the panel in; later ones find it in L2.
                let prefetch = if r0 == 0 && rows >= PREFETCH_ROWS {
                    PREFETCH_BYTES
                } else {
                    0
                };
                self.tile(isa, panel, acts, r0, rows, prefetch, &mut tile);
                for (r, t) in tile.iter().enumerate().take(rows) {
                    // SAFETY: row r0 + r < m, columns p * PANEL .. + cols < n (caller).
                    unsafe {
                        let dst = y.0.add((r0 + r) * n + p * PANEL);
                        std::ptr::copy_nonoverlapping(t.as_ptr(), dst, cols);
                    }
                }
            }
        }
    }

    /// One panel against rows `r0 .. r0 + rows` (`rows <= MR`) into `tile[r]`, prefetching
    /// `prefetch` bytes ahead (0: not).
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &self,
        isa: Isa,
        panel: &[u8],
        acts: &QActs,
        r0: usize,
        rows: usize,
        prefetch: usize,
        tile: &mut [[f32; PANEL]; MR],
    ) {
        let sc = self.qtype.scheme();
        #[cfg(target_arch = "x86_64")]
        if isa.has_avx512_vnni() {
            // SAFETY: VNNI was detected (with AVX-512F/BW/VL); the panel holds `k / 32` groups
            // (and `k / 256` headers) of this scheme and `acts` holds rows r0 .. r0 + rows of
            // `k` values.
            unsafe { crate::cpu::avx512::qmat_tile(sc, panel, acts, r0, rows, prefetch, tile) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa.has_avx2() {
            // SAFETY: AVX2, FMA and F16C were detected; the panel and rows as above.
            unsafe { crate::cpu::avx2::qmat_tile(sc, panel, acts, r0, rows, prefetch, tile) };
            return;
        }
        let _ = isa;
        tile_portable(sc, panel, acts, r0, rows, tile);
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint columns (see `QMatrix::matmul`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Activation rows quantized to int8 per group of 32, with what the kernels need besides.
pub struct QActs {
    pub(crate) m: usize,
    pub(crate) k: usize,
    /// `[m, k]` quants.
    pub(crate) q: Vec<i8>,
    /// `[m, k / 32]` scales `dx`.
    pub(crate) d: Vec<f32>,
    /// `[m, k / 16]`: `dx · Σq` over each 16 values (what an offset multiplies).
    pub(crate) sums: Vec<f32>,
}

impl QActs {
    /// Quantizes `x` `[m, k]` (`k % 32 == 0`): `dx = max|x| / 127`, `q = round(x / dx)`.
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        assert!(
            k.is_multiple_of(GROUP) && x.len() == m * k,
            "qmat: {} activations for {m} x {k}",
            x.len()
        );
        let groups = m * k / GROUP;
        let mut q = vec![0i8; m * k];
        let mut d = vec![0f32; groups];
        let mut sums = vec![0f32; groups * 2];
        for (g, (xs, qs)) in x
            .chunks_exact(GROUP)
            .zip(q.chunks_exact_mut(GROUP))
            .enumerate()
        {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let dx = amax / 127.0;
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            // Round half to even with the 1.5·2^23 trick: exact for |v| <= 127, and it
            // vectorises where `round` would be a call.
            const MAGIC: f32 = 12_582_912.0;
            for (qv, &v) in qs.iter_mut().zip(xs) {
                *qv = ((v * inv + MAGIC) - MAGIC) as i8;
            }
            d[g] = dx;
            for h in 0..2 {
                let s: i32 = qs[h * 16..][..16].iter().map(|&v| i32::from(v)).sum();
                sums[g * 2 + h] = dx * s as f32;
            }
        }
        Self { m, k, q, d, sums }
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    /// A bound on `|y - y_ref|` for output row `r`, where `y_ref` is the f32 product of the
    /// dequantized weights with the unquantized activations: rounding each activation moves it
    /// by at most `dx/2`, so the error is at most `Σ_g dx_g/2 · Σ_{j∈g} |w_j|`. `w_abs_group`
    /// gives `Σ|w|` over each group of the weight row.
    pub fn error_bound(&self, r: usize, w_abs_group: &[f32]) -> f32 {
        let g0 = r * self.k / GROUP;
        w_abs_group
            .iter()
            .enumerate()
            .map(|(g, a)| self.d[g0 + g] * 0.5 * a)
            .sum()
    }
}

/// A k-quant block's two levels per 16 values: scale `d·sc[i]`, offset `-dmin·m[i]` (or
/// `-zero·d·sc[i]` for the symmetric Q6_K and Q3_K, whose `dmin` and `m` are 0). Every such
/// product of an f16 and an integer of at most 8 bits is exact in f32.
#[derive(Clone, Copy, Debug, Default)]
struct KLevels {
    d: f32,
    dmin: f32,
    sc: [i8; 16],
    m: [i8; 16],
}

/// The levels of a k-quant block as GGUF stores them.
fn k_levels(qtype: QType, b: &[u8]) -> KLevels {
    let f16 = |i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let mut l = KLevels::default();
    match qtype {
        QType::Q4K | QType::Q5K => {
            (l.d, l.dmin) = (f16(0), f16(2));
            for j in 0..8 {
                let (sc, m) = k4_scale_min(j, &b[4..16]);
                // 6 bits: they fit an i8.
                l.sc[2 * j..][..2].fill(sc as i8);
                l.m[2 * j..][..2].fill(m as i8);
            }
        }
        QType::Q6K => {
            l.d = f16(208);
            for (o, &v) in l.sc.iter_mut().zip(&b[192..208]) {
                *o = v as i8;
            }
        }
        QType::Q2K => {
            (l.d, l.dmin) = (f16(80), f16(82));
            for (i, &v) in b[0..16].iter().enumerate() {
                l.sc[i] = (v & 0x0F) as i8;
                l.m[i] = (v >> 4) as i8;
            }
        }
        QType::Q3K => {
            l.d = f16(108);
            l.sc = k3_scales(&b[96..108]);
        }
        _ => unreachable!("{qtype:?} is no k-quant"),
    }
    l
}

/// Decodes one GGUF block into unsigned quants `u` (one per value) and per-16 scales `s` and
/// offsets `o`, so that value `j` is `s[j/16]·u[j] + o[j/16]` (ggml's `dequantize_row_*`).
fn decode_block(qtype: QType, b: &[u8], u: &mut [u8], s: &mut [f32], o: &mut [f32]) {
    if qtype.scheme().supers {
        let l = k_levels(qtype, b);
        let zero = qtype.scheme().zero;
        for i in 0..16 {
            s[i] = l.d * f32::from(l.sc[i]);
            o[i] = match zero {
                Some(z) => -f32::from(z) * s[i],
                None => -l.dmin * f32::from(l.m[i]),
            };
        }
    }
    let f16 = |i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let mut per32 = |j: usize, sv: f32, ov: f32| {
        s[2 * j] = sv;
        s[2 * j + 1] = sv;
        o[2 * j] = ov;
        o[2 * j + 1] = ov;
    };
    match qtype {
        QType::Q4_0 | QType::Q4_1 => {
            let (d, m, qs) = if qtype == QType::Q4_0 {
                (f16(0), -8.0 * f16(0), &b[2..18])
            } else {
                (f16(0), f16(2), &b[4..20])
            };
            per32(0, d, m);
            for j in 0..16 {
                u[j] = qs[j] & 0x0F;
                u[j + 16] = qs[j] >> 4;
            }
        }
        QType::Q5_0 | QType::Q5_1 => {
            let (d, m, at) = if qtype == QType::Q5_0 {
                (f16(0), -16.0 * f16(0), 2)
            } else {
                (f16(0), f16(2), 4)
            };
            per32(0, d, m);
            let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            let qs = &b[at + 4..at + 20];
            for j in 0..16 {
                u[j] = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
                u[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
        }
        QType::Q8_0 => {
            let d = f16(0);
            per32(0, d, -128.0 * d);
            for j in 0..32 {
                u[j] = (b[2 + j] as i8 as i16 + 128) as u8;
            }
        }
        QType::Q4K | QType::Q5K => {
            let (qh, qs) = if qtype == QType::Q4K {
                (None, &b[16..144])
            } else {
                (Some(&b[16..48]), &b[48..176])
            };
            for c in 0..4 {
                for h in 0..2 {
                    let j = 2 * c + h;
                    for l in 0..32 {
                        let q = qs[32 * c + l];
                        let mut v = if h == 0 { q & 0x0F } else { q >> 4 };
                        if let Some(qh) = qh {
                            v |= ((qh[l] >> j) & 1) << 4;
                        }
                        u[32 * j + l] = v;
                    }
                }
            }
        }
        QType::Q6K => {
            let (ql, qh) = (&b[0..128], &b[128..192]);
            for n in 0..2 {
                let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
                let u = &mut u[128 * n..];
                for l in 0..32 {
                    u[l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                    u[l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                    u[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    u[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
        QType::Q2K => {
            let qs = &b[16..80];
            for (e, ue) in u.iter_mut().enumerate() {
                let (n, r) = (e / 128, e % 128);
                let (j, half, l) = (r / 32, (r % 32) / 16, r % 16);
                *ue = (qs[32 * n + 16 * half + l] >> (2 * j)) & 3;
            }
        }
        QType::Q3K => {
            let (hm, qs) = (&b[0..32], &b[32..96]);
            for (e, ue) in u.iter_mut().enumerate() {
                let (n, r) = (e / 128, e % 128);
                let (j, half, l) = (r / 32, (r % 32) / 16, r % 16);
                let lo = (qs[32 * n + 16 * half + l] >> (2 * j)) & 3;
                let hi = (hm[16 * half + l] >> (4 * n + j)) & 1;
                *ue = lo | (hi << 2);
            }
        }
    }
}

/// Q4_K/Q5_K's 6-bit scale and min of sub-block `j` (ggml's `get_scale_min_k4`).
fn k4_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q3_K's sixteen 6-bit scales, minus 32.
fn k3_scales(raw: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 {
            raw[i] & 0x0F
        } else {
            raw[i - 8] >> 4
        };
        let high = (raw[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = ((low | (high << 4)) as i8) - 32;
    }
    out
}

/// Writes group `g` of a panel: quants interleaved four `k` at a time, then scales, offsets
/// (the k-quants' integer levels). `u` `[16, k]`, `s`/`o` `[16, k / 16]`, `levels`
/// `[16, k / 256]` per column of the panel.
#[allow(clippy::too_many_arguments)]
fn write_group(
    sc: Scheme,
    g: usize,
    k: usize,
    u: &[u8],
    s: &[f32],
    o: &[f32],
    levels: &[KLevels],
    out: &mut [u8],
) {
    let uq = |c: usize, j: usize| u[c * k + g * GROUP + j];
    match sc.bits {
        8 => {
            for j in 0..8 {
                for c in 0..PANEL {
                    for kk in 0..4 {
                        out[64 * j + 4 * c + kk] = uq(c, 4 * j + kk);
                    }
                }
            }
        }
        _ => {
            for t in 0..4 {
                for c in 0..PANEL {
                    for kk in 0..4 {
                        let lo = uq(c, 4 * t + kk) & 0x0F;
                        let hi = uq(c, 16 + 4 * t + kk) & 0x0F;
                        out[64 * t + 4 * c + kk] = lo | (hi << 4);
                    }
                }
            }
            // Bit planes: plane `b` (bit 4 + b), chunk `j` (k = 4j .. 4j + 4): one u64 whose
            // bit `4c + kk` is that bit of column c's value k = 4j + kk.
            for b in 0..usize::from(sc.bits - 4) {
                for j in 0..8 {
                    let mut mask = 0u64;
                    for c in 0..PANEL {
                        for kk in 0..4 {
                            let bit = (uq(c, 4 * j + kk) >> (4 + b)) & 1;
                            mask |= u64::from(bit) << (4 * c + kk);
                        }
                    }
                    out[256 + 64 * b + 8 * j..][..8].copy_from_slice(&mask.to_le_bytes());
                }
            }
        }
    }
    let halves = if sc.halves { 2 } else { 1 };
    let (at, offsets) = (sc.quant_bytes(), sc.quant_bytes() + sc.scale_bytes());
    for h in 0..halves {
        for c in 0..PANEL {
            let e = h * PANEL + c;
            if sc.supers {
                let l = &levels[c * k / SUPER + g * GROUP / SUPER];
                let i = (g * GROUP % SUPER) / 16 + h;
                out[at + e] = l.sc[i] as u8;
                if sc.zero.is_none() {
                    out[offsets + e] = l.m[i] as u8;
                }
                continue;
            }
            let i = c * k / 16 + 2 * g + h;
            let sv = half::f16::from_f32(s[i]).to_le_bytes();
            out[at + 2 * e..][..2].copy_from_slice(&sv);
            if sc.zero.is_none() {
                let ov = half::f16::from_f32(o[i]).to_le_bytes();
                out[offsets + 2 * e..][..2].copy_from_slice(&ov);
            }
        }
    }
}

/// Quant `j` (0..32) of column `c` in a packed group.
fn read_quant(sc: Scheme, grp: &[u8], c: usize, j: usize) -> u8 {
    let (chunk, kk) = (j / 4, j % 4);
    if sc.bits == 8 {
        return grp[64 * chunk + 4 * c + kk];
    }
    let byte = grp[64 * (chunk % 4) + 4 * c + kk];
    let mut v = if chunk < 4 { byte & 0x0F } else { byte >> 4 };
    for b in 0..usize::from(sc.bits - 4) {
        let mask = u64::from_le_bytes(grp[256 + 64 * b + 8 * chunk..][..8].try_into().unwrap());
        v |= (((mask >> (4 * c + kk)) & 1) as u8) << (4 + b);
    }
    v
}

/// Scale and offset of half `h` (0 unless per-16) of column `c` in group `g` of a panel, as
/// the SIMD kernels form them.
fn group_scale(sc: Scheme, panel: &[u8], g: usize, h: usize, c: usize) -> (f32, f32) {
    let grp = &panel[sc.group_at(g)..][..sc.group_bytes()];
    let f = |b: &[u8], i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let e = h * PANEL + c;
    let (at, offsets) = (sc.quant_bytes(), sc.quant_bytes() + sc.scale_bytes());
    let (s, o) = if sc.supers {
        let header = &panel[sc.header_at(g)..];
        let s = f(header, 2 * c) * f32::from(grp[at + e] as i8);
        let o = sc
            .zero
            .is_none()
            .then(|| f(header, 2 * (PANEL + c)) * f32::from(grp[offsets + e] as i8));
        (s, o)
    } else {
        let s = f(grp, at + 2 * e);
        (s, sc.zero.is_none().then(|| f(grp, offsets + 2 * e)))
    };
    let o = match sc.zero {
        Some(z) => -f32::from(z) * s,
        None => o.unwrap_or_default(),
    };
    (s, o)
}

/// The reference kernel: integer sums per group (or half), scaled as the SIMD kernels do.
fn tile_portable(
    sc: Scheme,
    panel: &[u8],
    acts: &QActs,
    r0: usize,
    rows: usize,
    tile: &mut [[f32; PANEL]; MR],
) {
    let k = acts.k;
    let gb = sc.group_bytes();
    for t in tile.iter_mut().take(rows) {
        t.fill(0.0);
    }
    for g in 0..k / GROUP {
        let grp = &panel[sc.group_at(g)..][..gb];
        for c in 0..PANEL {
            let mut u = [0u8; GROUP];
            for (j, v) in u.iter_mut().enumerate() {
                *v = read_quant(sc, grp, c, j);
            }
            let s0 = group_scale(sc, panel, g, 0, c);
            let scales = [
                s0,
                if sc.halves {
                    group_scale(sc, panel, g, 1, c)
                } else {
                    s0
                },
            ];
            for (r, t) in tile.iter_mut().enumerate().take(rows) {
                let row = r0 + r;
                let xq = &acts.q[row * k + g * GROUP..][..GROUP];
                let dx = acts.d[row * k / GROUP + g];
                let sums = &acts.sums[row * k / 16 + 2 * g..][..2];
                for h in 0..2 {
                    let isum: i32 = (16 * h..16 * h + 16)
                        .map(|j| i32::from(u[j]) * i32::from(xq[j]))
                        .sum();
                    let (s, o) = scales[h];
                    t[c] += s * dx * isum as f32 + o * sums[h];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    pub(crate) const ALL: [QType; 10] = [
        QType::Q4_0,
        QType::Q4_1,
        QType::Q5_0,
        QType::Q5_1,
        QType::Q8_0,
        QType::Q2K,
        QType::Q3K,
        QType::Q4K,
        QType::Q5K,
        QType::Q6K,
    ];

    /// Random bytes for `blocks` blocks of `qtype`, with sane f16 scales (random bits would be
    /// NaN or huge).
    fn random_blocks(qtype: QType, blocks: usize, rng: &mut impl Rng) -> Vec<u8> {
        let mut out = Vec::new();
        let f16_at: &[usize] = match qtype {
            QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => &[0],
            QType::Q4_1 | QType::Q5_1 | QType::Q4K | QType::Q5K => &[0, 2],
            QType::Q2K => &[80, 82],
            QType::Q3K => &[108],
            QType::Q6K => &[208],
        };
        for _ in 0..blocks {
            let mut b: Vec<u8> = (0..qtype.block_bytes()).map(|_| rng.random()).collect();
            for &i in f16_at {
                let v = half::f16::from_f32(rng.random_range(-0.05..0.05));
                b[i..i + 2].copy_from_slice(&v.to_le_bytes());
            }
            out.extend(b);
        }
        out
    }

    /// The values as ggml decodes them, straight from the blocks (f32 scales, no packing).
    fn decoded(qtype: QType, bytes: &[u8], n: usize, k: usize) -> Vec<f32> {
        let bv = qtype.block_values();
        let mut out = Vec::with_capacity(n * k);
        for blk in bytes.chunks_exact(qtype.block_bytes()) {
            let (mut u, mut s, mut o) = (vec![0u8; bv], vec![0f32; bv / 16], vec![0f32; bv / 16]);
            decode_block(qtype, blk, &mut u, &mut s, &mut o);
            out.extend((0..bv).map(|j| s[j / 16] * f32::from(u[j]) + o[j / 16]));
        }
        out
    }

    #[test]
    fn packing_keeps_every_value_exactly() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for qtype in ALL {
            let (n, k) = (37, 512);
            let bytes = random_blocks(qtype, n * k / qtype.block_values(), &mut rng);
            let want = decoded(qtype, &bytes, n, k);
            let got = QMatrix::pack(qtype, &bytes, n, k).unwrap().dequantize();
            // The file's f16 scales are kept as they are, the k-quants' two levels too, and
            // every scale or offset formed from them is exact in f32.
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{qtype:?} value {i}: {g} vs {w}");
            }
        }
    }

    /// Runs `qm` on every kernel set this CPU has against `x` `[m, k]`: each within the
    /// activation rounding bound of the f64 product, and all of them far inside it of each
    /// other; the SIMD sets, which apply the scales alike, to the bit.
    fn check_every_set(qm: &QMatrix, x: &[f32], m: usize) {
        let (n, k, qtype) = (qm.rows(), qm.cols(), qm.qtype());
        let w = qm.dequantize();
        let acts = QActs::quantize(x, m, k);
        let mut outs = Vec::new();
        for isa in Isa::available() {
            let mut y = vec![f32::NAN; m * n];
            qm.matmul(isa, &acts, &mut y);
            for r in 0..m {
                for c in 0..n {
                    let wr = &w[c * k..][..k];
                    let exact: f64 = (0..k)
                        .map(|i| f64::from(wr[i]) * f64::from(x[r * k + i]))
                        .sum();
                    let abs: Vec<f32> = wr
                        .chunks_exact(GROUP)
                        .map(|g| g.iter().map(|v| v.abs()).sum())
                        .collect();
                    // The rounding bound, plus f32 summation of k terms.
                    let bound = acts.error_bound(r, &abs) * 1.001 + 1e-4;
                    let got = y[r * n + c];
                    assert!(
                        (f64::from(got) - exact).abs() <= f64::from(bound),
                        "{qtype:?} {isa} [{m}x{k}]·[{n}] at ({r},{c}): {got} vs {exact}, bound \
                         {bound}"
                    );
                }
            }
            outs.push((isa, y));
        }
        // The sets compute the same integer sums: they agree far inside the bound.
        let (_, reference) = outs.last().unwrap();
        for (isa, y) in &outs {
            for (a, b) in y.iter().zip(reference) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{qtype:?} {isa}: {a} vs {b}"
                );
            }
        }
        let simd: Vec<_> = outs.iter().filter(|(i, _)| *i != Isa::Portable).collect();
        for pair in simd.windows(2) {
            let ((i0, y0), (i1, y1)) = (pair[0], pair[1]);
            for (a, b) in y0.iter().zip(y1) {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{qtype:?} {i0} vs {i1}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn every_kernel_set_stays_within_the_activation_rounding_bound() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for qtype in ALL {
            for (n, k, m) in [(16, 256, 1), (37, 512, 3), (5, 768, 8), (33, 256, 19)] {
                let bytes = random_blocks(qtype, n * k / qtype.block_values(), &mut rng);
                let qm = QMatrix::pack(qtype, &bytes, n, k).unwrap();
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                check_every_set(&qm, &x, m);
            }
        }
    }

    #[test]
    fn f32_values_quantized_to_q8_0_stay_within_half_a_step_and_multiply_on_every_set() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (n, k, m) = (24, 576, 3);
        let v: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.2..0.2)).collect();
        let qm = QMatrix::quantize_q8_0(&v, n, k).unwrap();
        assert_eq!((qm.rows(), qm.cols(), qm.qtype()), (n, k, QType::Q8_0));
        for (blk_v, blk_q) in v.chunks_exact(32).zip(qm.dequantize().chunks_exact(32)) {
            let amax = blk_v.iter().fold(0f32, |a, x| a.max(x.abs()));
            // Half a step, plus the f16 rounding of the scale (2^-11 of it) over 127 steps.
            let bound = amax / 127.0 * (0.5 + 127.0 / 2048.0) + 1e-7;
            for (a, b) in blk_v.iter().zip(blk_q) {
                assert!((a - b).abs() <= bound, "{a} held as {b}, bound {bound}");
            }
        }
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        check_every_set(&qm, &x, m);
        assert!(QMatrix::quantize_q8_0(&v[..n * 40], n, 40).is_err());
    }

    /// The largest integer sums: every quant at its top (or bottom) value, every activation
    /// at ±127. The AVX2 set sums pairs in saturating i16 and must not clip.
    #[test]
    fn extreme_quants_and_activations_do_not_saturate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (n, k, m) = (16, 512, 9);
        for qtype in ALL {
            for fill in [0x00, 0xFF, 0x7F, 0x80] {
                let mut bytes = random_blocks(qtype, n * k / qtype.block_values(), &mut rng);
                let scales: &[usize] = match qtype {
                    QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => &[0, 1],
                    QType::Q4_1 | QType::Q5_1 | QType::Q4K | QType::Q5K => &[0, 1, 2, 3],
                    QType::Q2K => &[80, 81, 82, 83],
                    QType::Q3K => &[108, 109],
                    QType::Q6K => &[208, 209],
                };
                for blk in bytes.chunks_exact_mut(qtype.block_bytes()) {
                    for (i, v) in blk.iter_mut().enumerate() {
                        if !scales.contains(&i) {
                            *v = fill;
                        }
                    }
                }
                let qm = QMatrix::pack(qtype, &bytes, n, k).unwrap();
                for sign in [1.0f32, -1.0] {
                    let x = vec![sign; m * k];
                    check_every_set(&qm, &x, m);
                }
            }
        }
    }

    #[test]
    fn several_weights_in_one_pass_equal_each_alone() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let k = 512;
        let ws: Vec<QMatrix> = [(QType::Q4K, 80), (QType::Q6K, 16), (QType::Q8_0, 40)]
            .iter()
            .map(|&(qt, n)| {
                let bytes = random_blocks(qt, n * k / qt.block_values(), &mut rng);
                QMatrix::pack(qt, &bytes, n, k).unwrap()
            })
            .collect();
        for m in [1, 3, 19] {
            let x: Vec<f32> = (0..m * k)
                .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                .collect();
            let acts = QActs::quantize(&x, m, k);
            for isa in Isa::available() {
                let alone: Vec<Vec<f32>> = ws
                    .iter()
                    .map(|w| {
                        let mut y = vec![0f32; m * w.rows()];
                        w.matmul(isa, &acts, &mut y);
                        y
                    })
                    .collect();
                let mut ys: Vec<Vec<f32>> =
                    ws.iter().map(|w| vec![f32::NAN; m * w.rows()]).collect();
                let mut parts: Vec<(&QMatrix, &mut [f32])> = ws
                    .iter()
                    .zip(ys.iter_mut())
                    .map(|(w, y)| (w, y.as_mut_slice()))
                    .collect();
                QMatrix::matmul_many(isa, &mut parts, &acts);
                for (a, b) in alone.iter().zip(&ys) {
                    assert!(
                        a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{isa:?} m={m}"
                    );
                }
            }
        }
    }

    #[test]
    fn resident_bytes_are_the_packed_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for qtype in ALL {
            let (n, k) = (48, 768);
            let bytes = random_blocks(qtype, n * k / qtype.block_values(), &mut rng);
            let qm = QMatrix::pack(qtype, &bytes, n, k).unwrap();
            assert_eq!(
                qm.bytes() as f64,
                (n * k) as f64 * qtype.packed_bits() / 8.0,
                "{qtype:?}"
            );
            let file = (qtype.block_bytes() * 8) as f64 / qtype.block_values() as f64;
            let over = qtype.packed_bits() / file;
            match qtype {
                // The types of a Q4_K_M / Q5_K_M file.
                QType::Q4K | QType::Q5K | QType::Q6K => assert!(over <= 1.03, "{qtype:?} {over}"),
                // Their quants take a nibble.
                QType::Q3K | QType::Q2K => assert!(over <= 2.0, "{qtype:?} {over}"),
                _ => assert_eq!(over, 1.0, "{qtype:?}"),
            }
        }
    }

    #[test]
    fn bad_shapes_are_refused_with_the_numbers() {
        let e = QMatrix::pack(QType::Q4K, &[0; 144], 1, 128).unwrap_err();
        assert_eq!(
            e.to_string(),
            "quantized matrix [1, 128]: k must be a multiple of 256 for Q4K"
        );
        let e = QMatrix::pack(QType::Q8_0, &[0; 33], 1, 32).unwrap_err();
        assert!(e.to_string().contains("33 bytes, expected 34"), "{e}");
    }
}

//! The AVX-512 set: the packed GEMM's tiles of up to 12 rows × 2 panels (one zmm per row and
//! panel), over rows copied k-major first so one pointer reaches every row of a tile. The
//! epilogue is the AVX2 one (`cpu/avx2.rs`).

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx2::store_row;
use crate::gemm::{
    CHUNK_BYTES, Epilogue, KIND_F16, KIND_F32, KIND_I8, MR_512, NR, PREFETCH_BYTES, PackedMatrix,
    RowTiles, Storage, Tile,
};

/// The gemm's panels on the AVX-512 kernels, over `tiles` of `a` packed by [`RowTiles::pack`].
///
/// # Safety
/// As `gemm::gemm_panels`'s; the CPU must support AVX-512F, AVX2, FMA and F16C.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_panels(
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
    let tile_at = |i: usize, p: usize, prefetch: bool| -> Tile {
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
                let t = tile_at(i, p, i == first);
                let mr = tiles.rows(i).len();
                // SAFETY: the tiles point into valid buffers (above); the caller detected
                // AVX-512.
                unsafe {
                    if p + 1 < panels.end {
                        tile(mr, &t, Some(&tile_at(i, p + 1, i == first)));
                    } else {
                        tile(mr, &t, None);
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
unsafe fn tile(mr: usize, t: &Tile, t1: Option<&Tile>) {
    macro_rules! by_rows {
        ($kind:expr, $pair:expr, $t1:expr) => {
            // SAFETY: forwarded from this function's contract.
            unsafe {
                match mr {
                    1 => tile_rows::<1, { $kind }, $pair>(t, $t1),
                    2 => tile_rows::<2, { $kind }, $pair>(t, $t1),
                    3 => tile_rows::<3, { $kind }, $pair>(t, $t1),
                    4 => tile_rows::<4, { $kind }, $pair>(t, $t1),
                    5 => tile_rows::<5, { $kind }, $pair>(t, $t1),
                    6 => tile_rows::<6, { $kind }, $pair>(t, $t1),
                    7 => tile_rows::<7, { $kind }, $pair>(t, $t1),
                    8 => tile_rows::<8, { $kind }, $pair>(t, $t1),
                    9 => tile_rows::<9, { $kind }, $pair>(t, $t1),
                    10 => tile_rows::<10, { $kind }, $pair>(t, $t1),
                    11 => tile_rows::<11, { $kind }, $pair>(t, $t1),
                    _ => tile_rows::<MR_512, { $kind }, $pair>(t, $t1),
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
/// Same products and the same order of sums as the AVX2 tile, so both give the same bits.
///
/// # Safety
/// As [`tile`]'s, with `R` rows and panels of the element type `KIND` names.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn tile_rows<const R: usize, const KIND: u8, const P: usize>(t: &Tile, t1: &Tile) {
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
        unsafe { store_row::<KIND>(t, r, lo, hi) };
        if P == 2 {
            let (lo, hi) = halves(acc1[r]);
            // SAFETY: as above.
            unsafe { store_row::<KIND>(t1, r, lo, hi) };
        }
    }
}

/// One panel of a [`crate::qmat::QMatrix`] against activation rows `r0 .. r0 + rows` into
/// `tile[r]`: each group's quants are unpacked into eight zmm registers (16 columns × 4 `k`)
/// once and multiplied with every row by `vpdpbusd`. With `prefetch > 0` each group first
/// prefetches the lines that far ahead of it (see `qmat::PREFETCH_BYTES`).
///
/// # Safety
/// The CPU must support AVX-512F/BW/VL and VNNI, FMA and F16C; `panel` holds `acts.k / 32`
/// groups (and `acts.k / 256` headers with `sc.supers`) laid out for `sc`; `rows <= MR` and
/// `r0 + rows <= acts.m`.
pub(crate) unsafe fn qmat_tile(
    sc: crate::qmat::Scheme,
    panel: &[u8],
    acts: &crate::qmat::QActs,
    r0: usize,
    rows: usize,
    prefetch: usize,
    tile: &mut [[f32; crate::qmat::PANEL]; crate::qmat::MR],
) {
    let (gb, sb) = (sc.group_bytes(), sc.super_bytes());
    debug_assert!(
        panel.len() == acts.k / 32 * gb + acts.k / 256 * sb && r0 + rows <= acts.m,
        "{sc:?}"
    );
    let args = (sc.zero, gb, sb, panel.as_ptr(), acts, r0, prefetch);
    macro_rules! by_rows {
        ($b:literal, $h:literal, $s:literal) => {
            // SAFETY: forwarded from the caller.
            unsafe {
                match rows {
                    1 => qmat_rows::<$b, $h, $s, 1>(args, tile),
                    2 => qmat_rows::<$b, $h, $s, 2>(args, tile),
                    3 => qmat_rows::<$b, $h, $s, 3>(args, tile),
                    4 => qmat_rows::<$b, $h, $s, 4>(args, tile),
                    5 => qmat_rows::<$b, $h, $s, 5>(args, tile),
                    6 => qmat_rows::<$b, $h, $s, 6>(args, tile),
                    7 => qmat_rows::<$b, $h, $s, 7>(args, tile),
                    _ => qmat_rows::<$b, $h, $s, 8>(args, tile),
                }
            }
        };
    }
    match (sc.bits, sc.halves, sc.supers) {
        (4, false, false) => by_rows!(4, false, false),
        (4, false, true) => by_rows!(4, false, true),
        (4, true, true) => by_rows!(4, true, true),
        (5, false, false) => by_rows!(5, false, false),
        (5, false, true) => by_rows!(5, false, true),
        (6, true, true) => by_rows!(6, true, true),
        (8, false, false) => by_rows!(8, false, false),
        _ => unreachable!("no packed scheme {sc:?}"),
    }
}

/// Zero point, group and header bytes, panel, activations, first row, prefetch distance.
type QmatArgs<'a> = (
    Option<u8>,
    usize,
    usize,
    *const u8,
    &'a crate::qmat::QActs,
    usize,
    usize,
);

/// `R` rows of one panel: a group's quants stay in eight zmm registers while every row passes.
///
/// # Safety
/// As [`qmat_tile`]'s, with `R` rows of the scheme `BITS`/`HALVES`/`SUPERS` names.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn qmat_rows<const BITS: u8, const HALVES: bool, const SUPERS: bool, const R: usize>(
    (zero, gb, sb, panel, acts, r0, prefetch): QmatArgs<'_>,
    tile: &mut [[f32; crate::qmat::PANEL]; crate::qmat::MR],
) {
    let k = acts.k;
    let (kd, ks) = (k / 32, k / 16);
    let quant_bytes = match BITS {
        4 => 256,
        5 => 320,
        6 => 384,
        _ => 512,
    };
    // A column's scale (or offset) is an f16, or an i8 under the block's super-scale.
    let elem = if SUPERS { 1 } else { 2 };
    let scale_bytes = elem * if HALVES { 32 } else { 16 };
    let lo = _mm512_set1_epi8(0x0F);
    let neg_zero = zero.map(|z| _mm512_set1_ps(-f32::from(z)));
    let mut acc = [_mm512_setzero_ps(); R];
    // The block's super-scales and negated super-mins of the 16 columns.
    let (mut sup_d, mut sup_m) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    // SAFETY (whole body): every pointer below stays inside `panel` (k / 32 groups of `gb`
    // bytes, with `SUPERS` k / 256 headers of `sb` bytes each before its 8 groups) or inside
    // rows r0 .. r0 + R of `acts` (the caller's contract).
    unsafe {
        let xq = acts.q.as_ptr().add(r0 * k);
        let dx = acts.d.as_ptr().add(r0 * kd);
        let sums = acts.sums.as_ptr().add(r0 * ks);
        let cvt = |p: *const u8| _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()));
        for g in 0..kd {
            let gp = if SUPERS {
                let header = panel.add(g / 8 * (sb + 8 * gb));
                if g % 8 == 0 {
                    sup_d = cvt(header);
                    if zero.is_none() {
                        sup_m = cvt(header.add(32));
                    }
                }
                header.add(sb + g % 8 * gb)
            } else {
                panel.add(g * gb)
            };
            if prefetch > 0 {
                // Every line of the group `prefetch` bytes ahead (steps of a line reach each
                // one); a prefetch never faults, so it may run past the panel and the matrix.
                let mut off = 0;
                while off < gb {
                    _mm_prefetch::<_MM_HINT_T0>(gp.wrapping_add(prefetch + off).cast());
                    off += 64;
                }
            }
            let mut w = [_mm512_setzero_si512(); 8];
            if BITS == 8 {
                for (j, wj) in w.iter_mut().enumerate() {
                    *wj = _mm512_loadu_si512(gp.add(64 * j).cast());
                }
            } else {
                for t in 0..4 {
                    let v = _mm512_loadu_si512(gp.add(64 * t).cast());
                    w[t] = _mm512_and_si512(v, lo);
                    w[t + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), lo);
                }
                for b in 0..usize::from(BITS - 4) {
                    let bit = _mm512_set1_epi8(16 << b);
                    for (j, wj) in w.iter_mut().enumerate() {
                        let m =
                            std::ptr::read_unaligned(gp.add(256 + 64 * b + 8 * j).cast::<u64>());
                        *wj = _mm512_or_si512(*wj, _mm512_maskz_mov_epi8(m, bit));
                    }
                }
            }
            let sp = gp.add(quant_bytes);
            // Exact either way: an f16 times an integer of at most 8 bits fits an f32.
            let level = |p: *const u8, sup: __m512| {
                if SUPERS {
                    let l = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast()));
                    _mm512_mul_ps(sup, _mm512_cvtepi32_ps(l))
                } else {
                    cvt(p)
                }
            };
            let s0 = level(sp, sup_d);
            let s1 = if HALVES {
                level(sp.add(16 * elem), sup_d)
            } else {
                s0
            };
            let (o0, o1) = match neg_zero {
                Some(z) => (_mm512_mul_ps(s0, z), _mm512_mul_ps(s1, z)),
                None => {
                    let o0 = level(sp.add(scale_bytes), sup_m);
                    (
                        o0,
                        if HALVES {
                            level(sp.add(scale_bytes + 16 * elem), sup_m)
                        } else {
                            o0
                        },
                    )
                }
            };
            for (r, a) in acc.iter_mut().enumerate() {
                let x = xq.add(r * k + g * 32);
                let bx = |j: usize| {
                    _mm512_set1_epi32(std::ptr::read_unaligned(x.add(4 * j).cast::<i32>()))
                };
                let d = _mm512_set1_ps(*dx.add(r * kd + g));
                let sm = sums.add(r * ks + 2 * g);
                if HALVES {
                    let mut i0 = _mm512_setzero_si512();
                    let mut i1 = _mm512_setzero_si512();
                    for j in 0..4 {
                        i0 = _mm512_dpbusd_epi32(i0, w[j], bx(j));
                        i1 = _mm512_dpbusd_epi32(i1, w[j + 4], bx(j + 4));
                    }
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_mul_ps(s0, d), *a);
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_mul_ps(s1, d), *a);
                    *a = _mm512_fmadd_ps(o0, _mm512_set1_ps(*sm), *a);
                    *a = _mm512_fmadd_ps(o1, _mm512_set1_ps(*sm.add(1)), *a);
                } else {
                    let mut i0 = _mm512_setzero_si512();
                    let mut i1 = _mm512_setzero_si512();
                    for j in 0..4 {
                        i0 = _mm512_dpbusd_epi32(i0, w[j], bx(j));
                        i1 = _mm512_dpbusd_epi32(i1, w[j + 4], bx(j + 4));
                    }
                    let i = _mm512_add_epi32(i0, i1);
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(s0, d), *a);
                    *a = _mm512_fmadd_ps(o0, _mm512_set1_ps(*sm + *sm.add(1)), *a);
                }
            }
        }
        for (t, a) in tile.iter_mut().zip(acc) {
            _mm512_storeu_ps(t.as_mut_ptr(), a);
        }
    }
}

// ---- attention ------------------------------------------------------------------------------

/// `exp(x)` on 16 lanes: the AVX2 `exp` (Cephes expf) widened, the same operations per lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> __m512 {
    let x = _mm512_max_ps(
        _mm512_min_ps(x, _mm512_set1_ps(88.376_26)),
        _mm512_set1_ps(-87.336_55),
    );
    let fx = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    // ln 2 split in two so `x - fx·ln 2` keeps its low bits.
    let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let y = _mm512_fmadd_ps(y, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    let pow2 = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(fx),
        _mm512_set1_epi32(127),
    ));
    _mm512_mul_ps(y, _mm512_castsi512_ps(pow2))
}

/// Sixteen lanes of the tiled attention ([`crate::attention::Lanes`]).
pub(crate) struct Lanes16;

// SAFETY: every method needs AVX-512F, which the trait's contract has its caller detect;
// pointers are valid for 16 floats by that contract.
unsafe impl crate::attention::Lanes for Lanes16 {
    type V = __m512;
    const L: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        // SAFETY: the trait's contract (AVX-512F detected, run inside such a function).
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> __m512 {
        // SAFETY: as in `zero`.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: as in `zero`; `p` is valid for 16 floats.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, x: __m512) {
        // SAFETY: as in `load`.
        unsafe { _mm512_storeu_ps(p, x) }
    }
    #[inline(always)]
    unsafe fn madd(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: as in `zero`.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        // SAFETY: as in `zero`.
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        // SAFETY: as in `zero`.
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        // SAFETY: as in `zero`.
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        // SAFETY: as in `zero`.
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn exp(x: __m512) -> __m512 {
        // SAFETY: as in `zero`.
        unsafe { exp16(x) }
    }
    /// Four rounds of shuffles and adds fold 16 vectors at once: 256-bit halves, 128-bit
    /// quarters, pairs, neighbours — [`crate::attention::fold`]'s tree for every vector. The
    /// inputs enter transposed (as 4 × 4) so lane `n` ends up holding `ys[n]`'s sum.
    #[inline(always)]
    unsafe fn fold_each(ys: &[__m512]) -> __m512 {
        let x: [__m512; 16] = std::array::from_fn(|n| ys[(n % 4) * 4 + n / 4]);
        // SAFETY: as in `zero`.
        unsafe {
            let mut h = [_mm512_setzero_ps(); 8];
            for (i, h) in h.iter_mut().enumerate() {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                *h = _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x44>(a, b),
                    _mm512_shuffle_f32x4::<0xEE>(a, b),
                );
            }
            let mut q = [_mm512_setzero_ps(); 4];
            for (j, q) in q.iter_mut().enumerate() {
                let (a, b) = (h[2 * j], h[2 * j + 1]);
                *q = _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0x88>(a, b),
                    _mm512_shuffle_f32x4::<0xDD>(a, b),
                );
            }
            let mut w = [_mm512_setzero_ps(); 2];
            for (j, w) in w.iter_mut().enumerate() {
                let (a, b) = (q[2 * j], q[2 * j + 1]);
                *w = _mm512_add_ps(
                    _mm512_shuffle_ps::<0x44>(a, b),
                    _mm512_shuffle_ps::<0xEE>(a, b),
                );
            }
            _mm512_add_ps(
                _mm512_shuffle_ps::<0x88>(w[0], w[1]),
                _mm512_shuffle_ps::<0xDD>(w[0], w[1]),
            )
        }
    }
}

/// The tiled attention of one work item on 16 lanes.
///
/// # Safety
/// The CPU must support AVX-512F, AVX2 and FMA; as [`crate::attention::Tile::compute`]'s.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn attention_tile(
    tile: &crate::attention::Tile<'_>,
    scores: &mut [f32],
    acc: &mut [f32],
    inv: &mut [f32],
) {
    // SAFETY: forwarded from this function's contract.
    unsafe { tile.compute::<Lanes16>(scores, acc, inv) }
}

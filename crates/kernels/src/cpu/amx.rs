//! The AMX set (Intel Advanced Matrix Extensions) for the packed GEMM: whether this CPU and
//! kernel let us use the tiles, the handful of tile instructions the bf16 kernel needs, and that
//! kernel.
//!
//! A tile is a 16-row × 64-byte register; `tdpbf16ps` multiplies a tile of 16 rows × 32 bf16
//! activations by a tile of 16 k-pairs × 16 columns of bf16 weights (two weights of one column
//! per 4 bytes, "VNNI" order) into a 16 × 16 f32 tile: 8,192 multiply-adds in one instruction.
//! The products of bf16 values are exact in f32 and are summed in k order with f32 rounding,
//! which is what the portable bf16 kernel does, so the two agree.
//!
//! Rust has no stable AMX intrinsics; each instruction is one `asm!` with the tile numbers as
//! constants. The tile registers are outside the compiler's register model, so nothing else
//! touches them between our blocks. Linux hands out the tile state only after a process asks
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), which [`available`] does once.

/// Bytes of one tile row (16 f32 or 32 bf16).
pub const ROW_BYTES: usize = 64;
/// Rows of a tile.
pub const ROWS: usize = 16;
/// bf16 values along k in one tile.
pub const K_BLOCK: usize = 32;

/// Whether the AMX tile and bf16 instructions may run in this process: the CPU reports them
/// (CPUID leaf 7: AMX-TILE, AMX-BF16) and Linux granted the tile state.
pub fn available() -> bool {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READY.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let (bf16, tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
            tile && bf16 && request_tile_state()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: true when granted (a kernel without
/// AMX support refuses, and then the tile instructions would fault).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: a plain system call; it only changes this process's permitted xsave features.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

/// The `ldtilecfg` operand: palette 1, every one of the 8 tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const FULL_TILES: Config = Config {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [
        ROW_BYTES as u16,
        64,
        64,
        64,
        64,
        64,
        64,
        64,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ],
    rows: [
        ROWS as u8, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0,
    ],
};

/// The tile instructions, each one `asm!` block (never reordered against one another).
#[cfg(target_arch = "x86_64")]
pub mod tile {
    use std::arch::asm;

    /// Configures all 8 tiles as full 16 × 64-byte tiles for this thread.
    ///
    /// # Safety
    /// [`super::available`] must have returned true.
    pub unsafe fn configure() {
        let cfg = &super::FULL_TILES;
        // SAFETY: `cfg` is a valid 64-byte palette-1 configuration (the caller checked AMX).
        unsafe { asm!("ldtilecfg [{p}]", p = in(reg) cfg, options(nostack, readonly)) };
    }

    /// Returns the tile state to its initial (unused) state.
    ///
    /// # Safety
    /// As [`configure`].
    pub unsafe fn release() {
        // SAFETY: as above.
        unsafe { asm!("tilerelease", options(nostack)) };
    }

    /// `tmmT = 0`.
    ///
    /// # Safety
    /// The tiles must be configured on this thread.
    pub unsafe fn zero<const T: u8>() {
        // SAFETY: as above.
        unsafe { asm!("tilezero tmm{t}", t = const T, options(nostack)) };
    }

    /// Loads 16 rows of 64 bytes, row `r` at `p + r·stride`, into `tmmT`.
    ///
    /// # Safety
    /// The tiles must be configured; the 16 rows must be readable.
    pub unsafe fn load<const T: u8>(p: *const u8, stride: usize) {
        // SAFETY: as above.
        unsafe {
            asm!(
                "tileloadd tmm{t}, [{p} + {s} * 1]",
                t = const T,
                p = in(reg) p,
                s = in(reg) stride,
                options(nostack, readonly),
            )
        };
    }

    /// Stores `tmmT`'s 16 rows of 64 bytes, row `r` at `p + r·stride`.
    ///
    /// # Safety
    /// The tiles must be configured; the 16 rows must be writable.
    pub unsafe fn store<const T: u8>(p: *mut u8, stride: usize) {
        // SAFETY: as above.
        unsafe {
            asm!(
                "tilestored [{p} + {s} * 1], tmm{t}",
                t = const T,
                p = in(reg) p,
                s = in(reg) stride,
                options(nostack),
            )
        };
    }

    /// `tmmC += tmmA · tmmB` (bf16 pairs, f32 sums).
    ///
    /// # Safety
    /// The tiles must be configured.
    pub unsafe fn dot<const C: u8, const A: u8, const B: u8>() {
        // SAFETY: as above.
        unsafe {
            asm!(
                "tdpbf16ps tmm{c}, tmm{a}, tmm{b}",
                c = const C,
                a = const A,
                b = const B,
                options(nostack),
            )
        };
    }
}

/// The gemm's panels on AMX tiles for a `Precision::Bf16` weight: each step of the k loop
/// loads two row tiles of `a` and two panels of `w` and does four tile products (2 × 2 output
/// tiles of 16 × 16); the output tiles go through a buffer to the AVX2 epilogue.
///
/// # Safety
/// As `gemm::gemm_panels`'s, with `a` from `gemm::pack_bf16` (`lda` bf16 values per row, whole row
/// tiles); AMX must be granted (`Isa::Amx`).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn gemm_panels(
    a: &[u16],
    lda: usize,
    m: usize,
    w: &crate::gemm::PackedMatrix,
    epi: crate::gemm::Epilogue<'_>,
    c: *mut f32,
    ldc: usize,
    panels: std::ops::Range<usize>,
) {
    use std::arch::x86_64::*;

    use super::avx2::store_row;
    use crate::gemm::{KIND_F16, NR, Storage, Tile};

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
                        store_row::<KIND_F16>(&t, r, lo, hi);
                    }
                }
                rt += 2;
            }
            p += 2;
        }
        tile::release();
    }
}

//! Intel AMX (Advanced Matrix Extensions) for the packed GEMM: whether this CPU and kernel let
//! us use the tiles, and the handful of tile instructions the bf16 kernel needs.
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

//! The one CPU-feature detector: which kernel set this process runs, decided once.

use std::sync::OnceLock;

/// An instruction set the kernels are written for, fastest first. Each set can run every
/// kernel of the sets after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// [`Isa::Avx512`] plus AMX tiles with bf16 (granted by the OS): packed bf16 weights
    /// multiply on the tiles, everything else as on AVX-512.
    Amx,
    /// x86-64 with AVX-512F besides AVX2, FMA and F16C: one register holds a panel's line, so a
    /// tile twice as tall costs the same weight loads.
    Avx512,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2Fma,
    /// Plain Rust (autovectorised for the target's baseline): the reference of every kernel.
    Portable,
}

impl Isa {
    /// The best set this CPU (and OS, for AMX) offers; detected on the first call.
    pub fn detect() -> Self {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(detect_uncached)
    }

    /// Every set this CPU can run, fastest first (the tests compare them all).
    pub fn available() -> Vec<Isa> {
        let all = [Isa::Amx, Isa::Avx512, Isa::Avx2Fma, Isa::Portable];
        let best = Isa::detect();
        all.into_iter().skip_while(|&i| i != best).collect()
    }

    /// Whether this set includes AVX2, FMA and F16C (the 8-lane kernels).
    pub fn has_avx2(self) -> bool {
        matches!(self, Isa::Amx | Isa::Avx512 | Isa::Avx2Fma)
    }

    /// Whether this set includes AVX-512F.
    pub fn has_avx512(self) -> bool {
        matches!(self, Isa::Amx | Isa::Avx512)
    }

    /// Whether this set includes AVX-512F and the CPU has AVX-512 VNNI, BW and VL (the int8
    /// kernels of [`crate::qmat`]).
    pub fn has_avx512_vnni(self) -> bool {
        static VNNI: OnceLock<bool> = OnceLock::new();
        self.has_avx512()
            && *VNNI.get_or_init(|| {
                #[cfg(target_arch = "x86_64")]
                {
                    is_x86_feature_detected!("avx512vnni")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vl")
                }
                #[cfg(not(target_arch = "x86_64"))]
                false
            })
    }

    /// The name used in benchmark tables and errors.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Amx => "amx",
            Isa::Avx512 => "avx512",
            Isa::Avx2Fma => "avx2",
            Isa::Portable => "portable",
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn detect_uncached() -> Isa {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        if is_x86_feature_detected!("avx512f") {
            if crate::cpu::amx::available() {
                return Isa::Amx;
            }
            return Isa::Avx512;
        }
        return Isa::Avx2Fma;
    }
    Isa::Portable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_detected_set_comes_first_and_portable_last() {
        let all = Isa::available();
        assert_eq!(all[0], Isa::detect());
        assert_eq!(*all.last().unwrap(), Isa::Portable);
        for pair in all.windows(2) {
            // Each set runs what the ones after it run.
            assert!(pair[0].has_avx2() >= pair[1].has_avx2(), "{all:?}");
            assert!(pair[0].has_avx512() >= pair[1].has_avx512(), "{all:?}");
        }
    }
}

//! One file per instruction set (the bodies behind each routine's dispatch). `amx` also holds
//! the tile layout constants the portable packing shares, so it is compiled on every target.

pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

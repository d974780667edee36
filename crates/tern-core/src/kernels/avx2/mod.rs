//! AVX2 + FMA + F16C kernels (x86-64). Integer dots use `vpmaddubsw` (unsigned weights ×
//! signed int8 activations) + `vpmaddwd`.

// Tile loops index several const-size register arrays with one counter.
#![allow(clippy::needless_range_loop)]

mod float;
mod i8row;
mod kquants;
pub(crate) mod packed;
mod q32;
pub(crate) mod quantize;
mod util;

use super::cpu::CpuLevel;
use super::dtype::DType;

/// Bytes ahead of the current weight block that streaming (decode) loops prefetch.
const PREFETCH: usize = 2048;
use super::matmul::Kernel;

/// The AVX2 kernel for `dtype`, if there is one. Callers check the CPU level first.
/// Decode tile heights were measured on matrices larger than L3 (kernel_bench `dram`/`151936`
/// shapes, 2 threads, Zen 3): 4 rows suit the cheap-to-unpack 4/5-bit types, while Q8_0 and
/// the K-quants stream fastest one row at a time (their per-row state would spill registers).
/// At the AVX-512 level the 32-element block types use VNNI dot products.
pub(crate) fn kernel(dtype: DType, level: CpuLevel) -> Option<Kernel> {
    let k = |tile, rows_decode, rows_prefill| Kernel { tile, rows_decode, rows_prefill };
    let vnni = level >= CpuLevel::Avx512;
    macro_rules! q32 {
        ($t:ty) => {
            if vnni {
                q32::vnni::tile::<$t>
            } else {
                q32::avx2::tile::<$t>
            }
        };
    }
    Some(match dtype {
        DType::Q4_0 => k(q32!(q32::Q4_0), 4, 3),
        DType::Q4_1 => k(q32!(q32::Q4_1), 4, 3),
        DType::Q5_0 => k(q32!(q32::Q5_0), 4, 3),
        DType::Q5_1 => k(q32!(q32::Q5_1), 4, 3),
        DType::Q8_0 => k(q32!(q32::Q8_0), 1, 3),
        DType::Q4_K => k(kquants::tile::<kquants::Q4K>, 1, 2),
        DType::Q5_K => k(kquants::tile::<kquants::Q5K>, 1, 2),
        DType::Q6_K => k(kquants::tile::<kquants::Q6K>, 1, 2),
        DType::F32 => k(float::tile::<float::F32>, 4, 2),
        DType::F16 => k(float::tile::<float::F16>, 4, 2),
        DType::BF16 => k(float::tile::<float::BF16>, 4, 2),
        DType::F8E4M3 => k(float::tile::<float::F8E4M3>, 4, 2),
        DType::I8 => k(if vnni { i8row::vnni::tile } else { i8row::avx2::tile }, 4, 3),
        _ => return None,
    })
}

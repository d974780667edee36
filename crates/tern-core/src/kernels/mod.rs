//! CPU kernels: GGML block types, dequantization, activation quantization, quantized and
//! float matrix multiplication (scalar reference + AVX2 SIMD chosen at run time, and AVX2 and
//! AVX-512 VNNI kernels over row-interleaved packed weights), and the thread pool they run on.

mod acts;
mod blocks;
mod cpu;
mod dequant;
mod dot_scalar;
mod dtype;
mod fp8;
mod matmul;
mod packed;
mod thread_pool;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests;

pub use acts::QuantizedActs;
pub use cpu::{cpu_features, cpu_level, CpuFeatures, CpuLevel};
pub use dequant::dequantize_row;
pub use dtype::{DType, QK, QK_K};
pub use fp8::{e4m3_from_f32, e4m3_to_f16_bits_scaled, e4m3_to_f32, E4M3_F16_SCALE, E4M3_MAX};
pub use matmul::{check_matmul_args, matmul, matmul_parallel, matmul_rows};
pub use packed::{matmul_packed_groups, packing_supported, PackedMatrix, GROUP};
pub use thread_pool::ThreadPool;

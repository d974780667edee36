//! The CUDA backend (cargo feature `cuda`): kernels compiled by nvcc at build time, the driver
//! and cuBLAS loaded at run time, and the engine runner that drives them.

pub mod device;
pub mod ops;
pub mod runner;
pub mod weights;

#[cfg(test)]
mod tests;

pub use runner::CudaRunner;

use anyhow::Result;
use device::{DevBuf, Gpu};

/// Device-to-device copy bandwidth of GPU `ordinal` in bytes/s, counting bytes read plus bytes
/// written (as the usual roofline figure does): the median of 10 copies of 2 GiB.
pub fn copy_bandwidth(ordinal: usize) -> Result<f64> {
    let gpu = Gpu::open(ordinal)?;
    let bytes = 2usize << 30;
    let (a, b) = (DevBuf::alloc(bytes)?, DevBuf::alloc(bytes)?);
    gpu.copy_device(b.ptr, a.ptr, bytes)?;
    let mut ms: Vec<f32> =
        (0..10).map(|_| gpu.time_ms(|| gpu.copy_device(b.ptr, a.ptr, bytes))).collect::<Result<_>>()?;
    ms.sort_by(f32::total_cmp);
    Ok(2.0 * bytes as f64 / (ms[5] as f64 * 1e-3))
}

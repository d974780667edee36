//! AVX2 + FMA + F16C kernels (x86-64). Integer dots use `vpmaddubsw` (unsigned weights ×
//! signed int8 activations) + `vpmaddwd`.

pub(crate) mod quantize;

use super::dtype::DType;
use super::matmul::Kernel;

/// The AVX2 kernel for `dtype`, if there is one. Callers check the CPU level first.
pub(crate) fn kernel(dtype: DType) -> Option<Kernel> {
    let _ = dtype;
    None
}

//! With the `cuda` feature, compiles src/cuda/kernels.cu with nvcc into one fatbin: machine
//! code for `CUDA_COMPUTE_CAP` (default 90, built as sm_90a for H100/H200) plus PTX of the
//! same architecture, so newer GPUs can JIT it. nvcc is `$NVCC`, else `$CUDA_ROOT/bin/nvcc`,
//! else `nvcc` on the PATH. Without the feature nothing is compiled and no CUDA is needed.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("kernels.fatbin");
    let nvcc = std::env::var("NVCC").ok().or_else(|| std::env::var("CUDA_ROOT").ok().map(|r| format!("{r}/bin/nvcc")));
    let nvcc = nvcc.unwrap_or_else(|| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap: String = cap.chars().filter(|c| c.is_ascii_digit()).collect();
    // Hopper's own instructions (wgmma, setmaxnreg) need the "a" target.
    let sass = if cap == "90" { "90a".to_string() } else { cap.clone() };
    let status = Command::new(&nvcc)
        .args(["-fatbin", "-O3", "-std=c++17", "-lineinfo"])
        .arg(format!("-gencode=arch=compute_{sass},code=sm_{sass}"))
        .arg(format!("-gencode=arch=compute_{cap},code=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("src/cuda/kernels.cu")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("nvcc failed ({s}) compiling src/cuda/kernels.cu"),
        Err(e) => panic!(
            "the `cuda` feature needs nvcc ({nvcc}: {e}); install the CUDA toolkit or set NVCC / CUDA_ROOT \
             (see the README's GPU section)"
        ),
    }
}

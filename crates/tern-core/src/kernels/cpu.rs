//! Run-time CPU feature detection, done once and cached.
//!
//! Kernels are compiled for several instruction-set levels with `#[target_feature]` and the
//! best one this CPU supports is chosen here. `TERN_CPU_FEATURES=scalar|avx2|avx512` can force a
//! lower level (tests, comparisons); asking for more than the CPU has falls back to what it has.

use std::sync::OnceLock;

/// Instruction-set level used by the kernels, ordered from least to most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuLevel {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL/VNNI (on top of AVX2).
    Avx512,
}

impl CpuLevel {
    pub fn name(self) -> &'static str {
        match self {
            CpuLevel::Scalar => "scalar",
            CpuLevel::Avx2 => "avx2",
            CpuLevel::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<CpuLevel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "none" => Some(CpuLevel::Scalar),
            "avx2" => Some(CpuLevel::Avx2),
            "avx512" => Some(CpuLevel::Avx512),
            _ => None,
        }
    }
}

/// What the CPU supports, as far as the kernels care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeatures {
    /// Highest level the hardware supports.
    pub detected: CpuLevel,
    /// Level the kernels use (detected, possibly lowered by `TERN_CPU_FEATURES`).
    pub level: CpuLevel,
    /// AVX-VNNI (256-bit `vpdpbusd`), usable at the AVX2 level.
    pub avx_vnni: bool,
}

#[cfg(target_arch = "x86_64")]
fn detect_hw() -> (CpuLevel, bool) {
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
    let avx512 = avx2
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni");
    let vnni = avx2 && is_x86_feature_detected!("avxvnni");
    let level = if avx512 {
        CpuLevel::Avx512
    } else if avx2 {
        CpuLevel::Avx2
    } else {
        CpuLevel::Scalar
    };
    (level, vnni)
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_hw() -> (CpuLevel, bool) {
    (CpuLevel::Scalar, false)
}

fn detect() -> CpuFeatures {
    let (detected, avx_vnni) = detect_hw();
    let requested = std::env::var("TERN_CPU_FEATURES").ok().and_then(|s| CpuLevel::parse(&s));
    let level = match requested {
        Some(r) => r.min(detected),
        None => detected,
    };
    CpuFeatures { detected, level, avx_vnni: avx_vnni && level >= CpuLevel::Avx2 }
}

/// The cached CPU features (detected on first call).
pub fn cpu_features() -> CpuFeatures {
    static FEATURES: OnceLock<CpuFeatures> = OnceLock::new();
    *FEATURES.get_or_init(detect)
}

/// The level the kernels use.
pub fn cpu_level() -> CpuLevel {
    cpu_features().level
}

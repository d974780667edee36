//! Tensor element types as GGUF stores them, with ggml's block layouts.

use anyhow::{bail, Result};

/// Elements per K-quant super-block.
pub const QK_K: usize = 256;
/// Elements per block of the 32-element formats (Q4_0 .. Q8_0).
pub const QK: usize = 32;

#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    /// int8 values, one per element; a matrix stored this way carries one f32 scale per row
    /// (or per tensor) beside it (`tern quantize --method w8a8`).
    I8,
    /// FP8 E4M3 codes, one per element, with a row or tensor scale like `I8`. GGUF has no FP8
    /// type: files store the codes as I8 tensors and say so in `tern.quantize.method`.
    F8E4M3,
}

impl DType {
    pub const ALL: [DType; 15] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q5_0,
        DType::Q5_1,
        DType::Q8_0,
        DType::Q2_K,
        DType::Q3_K,
        DType::Q4_K,
        DType::Q5_K,
        DType::Q6_K,
        DType::I8,
        DType::F8E4M3,
    ];

    /// Maps a GGML type id (as in GGUF tensor infos) to a DType.
    pub fn from_ggml(id: u32) -> Option<DType> {
        Some(match id {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            6 => DType::Q5_0,
            7 => DType::Q5_1,
            8 => DType::Q8_0,
            10 => DType::Q2_K,
            11 => DType::Q3_K,
            12 => DType::Q4_K,
            13 => DType::Q5_K,
            14 => DType::Q6_K,
            24 => DType::I8,
            30 => DType::BF16,
            _ => return None,
        })
    }

    /// The GGML type id (F8E4M3 is stored as I8).
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q2_K => 10,
            DType::Q3_K => 11,
            DType::Q4_K => 12,
            DType::Q5_K => 13,
            DType::Q6_K => 14,
            DType::I8 | DType::F8E4M3 => 24,
            DType::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 | DType::I8 | DType::F8E4M3 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => QK,
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K => QK_K,
        }
    }

    /// Bytes per block (ggml-common.h).
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 | DType::F8E4M3 => 1,
            DType::Q4_0 => 2 + 16,
            DType::Q4_1 => 2 + 2 + 16,
            DType::Q5_0 => 2 + 4 + 16,
            DType::Q5_1 => 2 + 2 + 4 + 16,
            DType::Q8_0 => 2 + 32,
            DType::Q2_K => 16 + 64 + 2 + 2,
            DType::Q3_K => 32 + 64 + 12 + 2,
            DType::Q4_K => 2 + 2 + 12 + 128,
            DType::Q5_K => 2 + 2 + 12 + 32 + 128,
            DType::Q6_K => 128 + 64 + 16 + 2,
        }
    }

    /// Bytes of one row of `k` elements; errors if `k` is not a whole number of blocks.
    pub fn row_bytes(self, k: usize) -> Result<usize> {
        let bl = self.block_len();
        if !k.is_multiple_of(bl) {
            bail!("{}: row length {k} is not a multiple of the block length {bl}", self.name());
        }
        Ok(k / bl * self.block_bytes())
    }

    /// ggml's name for the type.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::Q8_0 => "q8_0",
            DType::Q2_K => "q2_K",
            DType::Q3_K => "q3_K",
            DType::Q4_K => "q4_K",
            DType::Q5_K => "q5_K",
            DType::Q6_K => "q6_K",
            DType::I8 => "i8",
            DType::F8E4M3 => "f8_e4m3",
        }
    }

    pub fn is_quantized(self) -> bool {
        !matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// Whether a matrix of this type needs its row scales beside it (its stored values are
    /// the weights divided by them).
    pub fn needs_row_scale(self) -> bool {
        matches!(self, DType::I8 | DType::F8E4M3)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_roundtrip_and_sizes() {
        for dt in DType::ALL {
            let stored = if dt == DType::F8E4M3 { DType::I8 } else { dt };
            assert_eq!(DType::from_ggml(dt.ggml_id()), Some(stored));
        }
        assert_eq!(DType::from_ggml(4), None);
        assert_eq!(DType::Q4_K.block_bytes(), 144);
        assert_eq!(DType::Q6_K.block_bytes(), 210);
        assert_eq!(DType::Q5_K.block_bytes(), 176);
        assert_eq!(DType::Q3_K.block_bytes(), 110);
        assert_eq!(DType::Q2_K.block_bytes(), 84);
        assert_eq!(DType::Q4_0.row_bytes(64).unwrap(), 36);
        assert!(DType::Q4_0.row_bytes(33).is_err());
        assert!(DType::Q4_K.row_bytes(576).is_err());
        assert_eq!(DType::F16.row_bytes(7).unwrap(), 14);
    }
}

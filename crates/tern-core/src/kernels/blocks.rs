//! Byte-level helpers for ggml block layouts (ggml-common.h), shared by the dequantizers and
//! the scalar dot products.

#[inline(always)]
pub fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Little-endian u16 at `b[i..i+2]`.
#[inline(always)]
pub fn le_u16(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

/// f16 stored little-endian at `b[i..i+2]`, as f32.
#[inline(always)]
pub fn le_f16(b: &[u8], i: usize) -> f32 {
    f16_to_f32(le_u16(b, i))
}

#[inline(always)]
pub fn le_u32(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Scale and min of sub-block `j` (0..8) from Q4_K/Q5_K's 12 packed bytes of 6-bit values.
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q3_K's 16 signed 6-bit sub-block scales (already minus 32) from its 12 packed bytes.
#[inline(always)]
pub fn q3k_scales(s: &[u8]) -> [i8; 16] {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let a0 = le_u32(s, 0);
    let a1 = le_u32(s, 4);
    let tmp = le_u32(s, 8);
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let mut out = [0i8; 16];
    for (i, a) in aux.iter().enumerate() {
        for (j, byte) in a.to_le_bytes().iter().enumerate() {
            out[4 * i + j] = (*byte as i8).wrapping_sub(32);
        }
    }
    out
}

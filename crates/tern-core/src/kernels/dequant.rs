//! Scalar dequantization of one row to f32: the reference every kernel is tested against.

use super::blocks::{bf16_to_f32, f16_to_f32, le_f16, le_u16, le_u32, q3k_scales, scale_min_k4};
use super::dtype::{DType, QK, QK_K};
use anyhow::{ensure, Result};

/// Dequantizes one row: `src` holds `dst.len()` elements of `dtype`.
pub fn dequantize_row(dtype: DType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    let need = dtype.row_bytes(dst.len())?;
    ensure!(src.len() == need, "dequantize_row {dtype}: {} elements need {need} bytes, got {}", dst.len(), src.len());
    let bb = dtype.block_bytes();
    let bl = dtype.block_len();
    match dtype {
        DType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        DType::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16_to_f32(u16::from_le_bytes([s[0], s[1]]));
            }
        }
        DType::BF16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16_to_f32(u16::from_le_bytes([s[0], s[1]]));
            }
        }
        // Before their row scale (the matrix applies it).
        DType::I8 => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s as i8 as f32),
        DType::F8E4M3 => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = super::fp8::e4m3_to_f32(s)),
        _ => {
            for (b, y) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(bl)) {
                dequant_block(dtype, b, y);
            }
        }
    }
    Ok(())
}

fn dequant_block(dtype: DType, b: &[u8], y: &mut [f32]) {
    match dtype {
        DType::Q4_0 => {
            let d = le_f16(b, 0);
            let qs = &b[2..18];
            for j in 0..QK / 2 {
                y[j] = d * ((qs[j] & 0xF) as i32 - 8) as f32;
                y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
            }
        }
        DType::Q4_1 => {
            let (d, m) = (le_f16(b, 0), le_f16(b, 2));
            let qs = &b[4..20];
            for j in 0..QK / 2 {
                y[j] = d * (qs[j] & 0xF) as f32 + m;
                y[j + 16] = d * (qs[j] >> 4) as f32 + m;
            }
        }
        DType::Q5_0 => {
            let d = le_f16(b, 0);
            let qh = le_u32(b, 2);
            let qs = &b[6..22];
            for j in 0..QK / 2 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                y[j] = d * (((qs[j] & 0xF) as u32 | h0) as i32 - 16) as f32;
                y[j + 16] = d * (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32;
            }
        }
        DType::Q5_1 => {
            let (d, m) = (le_f16(b, 0), le_f16(b, 2));
            let qh = le_u32(b, 4);
            let qs = &b[8..24];
            for j in 0..QK / 2 {
                let h0 = ((qh >> j) << 4) & 0x10;
                let h1 = (qh >> (j + 12)) & 0x10;
                y[j] = d * ((qs[j] & 0xF) as u32 | h0) as f32 + m;
                y[j + 16] = d * ((qs[j] >> 4) as u32 | h1) as f32 + m;
            }
        }
        DType::Q8_0 => {
            let d = le_f16(b, 0);
            for j in 0..QK {
                y[j] = d * (b[2 + j] as i8) as f32;
            }
        }
        DType::Q2_K => {
            let scales = &b[0..16];
            let qs = &b[16..80];
            let (d, dmin) = (le_f16(b, 80), le_f16(b, 82));
            let mut is = 0;
            let mut out = 0;
            for half in 0..2 {
                let q = &qs[32 * half..32 * half + 32];
                for shift in [0, 2, 4, 6] {
                    for part in 0..2 {
                        let sc = scales[is];
                        is += 1;
                        let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                        for l in 0..16 {
                            y[out] = dl * ((q[16 * part + l] >> shift) & 3) as f32 - ml;
                            out += 1;
                        }
                    }
                }
            }
        }
        DType::Q3_K => {
            let hm = &b[0..32];
            let qs = &b[32..96];
            let scales = q3k_scales(&b[96..108]);
            let d = le_f16(b, 108);
            let mut is = 0;
            let mut out = 0;
            let mut m = 1u8;
            for half in 0..2 {
                let q = &qs[32 * half..32 * half + 32];
                for shift in [0, 2, 4, 6] {
                    for part in 0..2 {
                        let dl = d * scales[is] as f32;
                        is += 1;
                        for l in 0..16 {
                            let i = 16 * part + l;
                            let lo = ((q[i] >> shift) & 3) as i32;
                            let v = lo - if hm[i] & m != 0 { 0 } else { 4 };
                            y[out] = dl * v as f32;
                            out += 1;
                        }
                    }
                    m <<= 1;
                }
            }
        }
        DType::Q4_K => {
            let (d, dmin) = (le_f16(b, 0), le_f16(b, 2));
            let sc = &b[4..16];
            let qs = &b[16..144];
            for j in 0..QK_K / 64 {
                let (s1, m1) = scale_min_k4(2 * j, sc);
                let (s2, m2) = scale_min_k4(2 * j + 1, sc);
                let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                let q = &qs[32 * j..32 * j + 32];
                for l in 0..32 {
                    y[64 * j + l] = d1 * (q[l] & 0xF) as f32 - m1;
                    y[64 * j + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
                }
            }
        }
        DType::Q5_K => {
            let (d, dmin) = (le_f16(b, 0), le_f16(b, 2));
            let sc = &b[4..16];
            let qh = &b[16..48];
            let qs = &b[48..176];
            for j in 0..QK_K / 64 {
                let (s1, m1) = scale_min_k4(2 * j, sc);
                let (s2, m2) = scale_min_k4(2 * j + 1, sc);
                let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
                let q = &qs[32 * j..32 * j + 32];
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    y[64 * j + l] = d1 * ((q[l] & 0xF) + h1) as f32 - m1;
                    y[64 * j + 32 + l] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
                }
            }
        }
        DType::Q6_K => {
            let ql = &b[0..128];
            let qh = &b[128..192];
            let sc = &b[192..208];
            let d = f16_to_f32(le_u16(b, 208));
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                let y = &mut y[128 * n..];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
        DType::F32 | DType::F16 | DType::BF16 | DType::I8 | DType::F8E4M3 => unreachable!("not a block type"),
    }
}

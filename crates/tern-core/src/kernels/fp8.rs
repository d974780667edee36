//! FP8 E4M3 (the OCP "e4m3fn" format of H100 tensor cores): 1 sign, 4 exponent (bias 7) and
//! 3 mantissa bits, finite range ±448, subnormals down to 2⁻⁹, no infinities. tern never
//! writes the NaN codes (0x7F/0xFF): encoding saturates at 448.

/// Largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// The nearest E4M3 code to `v`, ties to even (as PyTorch's `float8_e4m3fn` conversion: ties
/// away from zero bias weights that came from bf16, whose scaled values often land on ties),
/// saturating at ±448; NaN encodes as 0.
pub fn e4m3_from_f32(v: f32) -> u8 {
    if v.is_nan() {
        return 0;
    }
    let sign = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs().min(E4M3_MAX);
    // Binade of `a` (subnormals share the smallest normal binade, 2⁻⁶); 8 steps per binade.
    let e = (((a.to_bits() >> 23) & 0xFF) as i32 - 127).max(-6);
    let step = f32::from_bits(((e - 3 + 127) as u32) << 23);
    let n = (a / step).round_ties_even() as i32; // 0..=16; 16 carries into the next binade below
    let code = ((e + 7) << 3) + n - 8;
    sign | code.min(0x7E) as u8
}

/// The value of an E4M3 code (the NaN codes decode as 480, never produced by
/// [`e4m3_from_f32`]).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let e = ((b >> 3) & 0xF) as i32;
    let m = (b & 7) as f32;
    let a = if e == 0 { m / 8.0 * 2f32.powi(-6) } else { (1.0 + m / 8.0) * 2f32.powi(e - 7) };
    if b & 0x80 != 0 {
        -a
    } else {
        a
    }
}

/// The f16 bit pattern whose value is 2⁻⁸ × the E4M3 code's value: exponent and mantissa
/// move into f16's fields unchanged (f16's bias is 8 more), so SIMD loops convert 8 codes with
/// shifts and one `vcvtph2ps`, and fold the 2⁸ into a scale.
#[inline]
pub fn e4m3_to_f16_bits_scaled(b: u8) -> u16 {
    (((b & 0x80) as u16) << 8) | (((b & 0x7F) as u16) << 7)
}

/// 2⁸: what [`e4m3_to_f16_bits_scaled`] values are multiplied by.
pub const E4M3_F16_SCALE: f32 = 256.0;

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn every_code_round_trips_and_f16_bits_agree() {
        for b in 0..=255u8 {
            if b & 0x7F == 0x7F {
                continue; // NaN codes
            }
            let v = e4m3_to_f32(b);
            let back = e4m3_from_f32(v);
            // ±0 both encode with their sign.
            assert_eq!(back, b, "code {b:#04x} = {v}");
            let via_f16 = f16::from_bits(e4m3_to_f16_bits_scaled(b)).to_f32() * E4M3_F16_SCALE;
            assert_eq!(via_f16, v, "code {b:#04x}");
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
    }

    #[test]
    fn encoding_matches_pytorch() {
        // reference/fp8_e4m3.py: torch's float8_e4m3fn codes of ties, near-ties, subnormals and
        // random values.
        let data = include_str!("testdata/e4m3_torch.txt");
        let mut n = 0;
        for line in data.lines().filter(|l| !l.starts_with('#')) {
            let (bits, code) = line.split_once(' ').unwrap();
            let v = f32::from_bits(u32::from_str_radix(bits, 16).unwrap());
            let want = u8::from_str_radix(code, 16).unwrap();
            // torch writes +0 for -0.0; both decode to zero.
            let got = if v == 0.0 { want } else { e4m3_from_f32(v) };
            assert_eq!(got, want, "{v:e}: {got:#04x}, torch {want:#04x}");
            n += 1;
        }
        assert_eq!(n, 5010);
    }

    #[test]
    fn encoding_rounds_to_nearest_and_saturates() {
        let codes: Vec<f32> = (0..0x7Fu8).map(e4m3_to_f32).collect();
        let mut x = -500f32;
        while x < 500.0 {
            let got = e4m3_to_f32(e4m3_from_f32(x));
            let best = codes.iter().map(|&c| (c - x.abs()).abs()).fold(f32::INFINITY, f32::min);
            assert!((got.abs() - x.abs()).abs() <= best + 1e-6, "{x} → {got}, nearest is {best} away");
            assert!(got.abs() <= E4M3_MAX);
            x += 0.0137;
        }
        assert_eq!(e4m3_from_f32(1e-30), 0);
        assert_eq!(e4m3_from_f32(f32::NAN), 0);
    }
}

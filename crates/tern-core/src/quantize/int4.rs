//! Group-wise asymmetric int4: w ≈ d·q + m with q ∈ 0..=15, d the group's scale and m = −d·z
//! for an integer zero point z (so 0 is on the grid, up to the f16 rounding of m), both
//! rounded to f16 as GGUF Q4_1 stores them. A group of g columns (g a multiple of 32) is written as g/32 Q4_1 blocks
//! that share (d, m); llama.cpp and transformers read the result as ordinary Q4_1.

use half::f16;

/// The quantization grid of one group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Grid {
    pub d: f32,
    pub m: f32,
}

impl Grid {
    /// The round-to-nearest grid for values in [lo, hi] (the range is widened to hold 0).
    pub fn for_range(lo: f32, hi: f32) -> Grid {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        if hi - lo <= 0.0 {
            return Grid { d: 0.0, m: 0.0 };
        }
        let d = round_f16((hi - lo) / 15.0);
        let z = (-lo / d).round().clamp(0.0, 15.0);
        Grid { d, m: round_f16(-d * z) }
    }

    pub fn for_values(w: &[f32]) -> Grid {
        let (lo, hi) = w.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        Grid::for_range(lo, hi)
    }

    pub fn code(&self, w: f32) -> u8 {
        if self.d == 0.0 {
            return 0;
        }
        ((w - self.m) / self.d).round().clamp(0.0, 15.0) as u8
    }

    pub fn value(&self, q: u8) -> f32 {
        self.d * q as f32 + self.m
    }
}

fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// An int4 matrix: codes row-major and one grid per (row, group).
#[derive(Clone, Debug)]
pub struct Int4Matrix {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    pub codes: Vec<u8>,
    pub grids: Vec<Grid>,
}

impl Int4Matrix {
    pub fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(self.group)
    }

    pub fn grid(&self, r: usize, c: usize) -> Grid {
        self.grids[r * self.groups_per_row() + c / self.group]
    }

    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows * self.cols).map(|e| self.grid(e / self.cols, e % self.cols).value(self.codes[e])).collect()
    }

    /// GGUF Q4_1 blocks, row-major.
    pub fn to_q4_1(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.rows * self.cols / 32 * 20);
        for r in 0..self.rows {
            for b in 0..self.cols / 32 {
                let g = self.grid(r, b * 32);
                out.extend(f16::from_f32(g.d).to_le_bytes());
                out.extend(f16::from_f32(g.m).to_le_bytes());
                let q = &self.codes[r * self.cols + b * 32..][..32];
                out.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
            }
        }
        out
    }
}

/// Round-to-nearest int4 of a row-major matrix with groups of `group` columns.
pub fn rtn(w: &[f32], rows: usize, cols: usize, group: usize) -> Int4Matrix {
    let gpr = cols.div_ceil(group);
    let mut grids = Vec::with_capacity(rows * gpr);
    let mut codes = Vec::with_capacity(rows * cols);
    for row in w.chunks_exact(cols) {
        for grp in row.chunks(group) {
            let g = Grid::for_values(grp);
            grids.push(g);
            codes.extend(grp.iter().map(|&v| g.code(v)));
        }
    }
    Int4Matrix { rows, cols, group, codes, grids }
}

/// Reads Q4_1 blocks back (for tests and tools): codes and per-block grids.
pub fn q4_1_block(b: &[u8]) -> (Grid, [u8; 32]) {
    let h = |i: usize| f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32();
    let g = Grid { d: h(0), m: h(2) };
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = b[4 + j] & 0xF;
        q[j + 16] = b[4 + j] >> 4;
    }
    (g, q)
}

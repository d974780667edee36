//! The weights of a decoder, however they were loaded (GGUF, safetensors, dummy).
//!
//! Matrices keep their stored encoding (a GGUF block type, f16, bf16, f32) and stay in the
//! memory map when they came from a file: the matmul kernels read the quantized blocks directly.

use crate::kernels::{DType, PackedMatrix};
use crate::model::config::ModelConfig;
use anyhow::{bail, Result};
use memmap2::Mmap;
use std::sync::Arc;

/// Bytes of one tensor: a window of a memory-mapped file, or an owned buffer.
#[derive(Clone)]
pub enum Bytes {
    Mapped { map: Arc<Mmap>, offset: usize, len: usize },
    Owned(Arc<Vec<u8>>),
}

impl Bytes {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { map, offset, len } => &map[*offset..*offset + *len],
            Bytes::Owned(v) => v,
        }
    }

    /// Drops the resident pages of a mapped range (they are read from the file again if
    /// touched); nothing for owned bytes. Only a hint: failure changes nothing but memory use.
    fn release_pages(&self) {
        if let Bytes::Mapped { map, offset, len } = self {
            // SAFETY: the map is read-only and file-backed, so dropped pages are re-read from
            // the file on the next access with the same contents.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, *offset, *len) };
        }
    }
}

/// A row-major matrix of `rows` × `cols` in `dtype` (each row is `cols` elements).
#[derive(Clone)]
pub struct Matrix {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: Bytes,
    /// LLM.int8()-style outlier input channels, multiplied apart in f32 (zero in `bytes`).
    pub outliers: Option<Arc<Outliers>>,
    /// I8/F8E4M3 matrices: the stored values times these are the weights (one per row, or
    /// one for the whole matrix).
    pub row_scale: Option<Arc<Vec<f32>>>,
    /// The same values regrouped for the AVX2 / AVX-512 kernels (see `kernels::PackedMatrix`); the
    /// CPU decoder's products read this instead of `bytes` where it exists.
    pub packed: Option<Arc<PackedMatrix>>,
}

/// Input channels whose activations are too large for int8: their weight columns are kept in
/// f32 (`w`, rows × cols.len(), row-major) and the stored matrix holds zeros there.
#[derive(Clone, Debug)]
pub struct Outliers {
    pub cols: Vec<usize>,
    pub w: Vec<f32>,
}

impl Outliers {
    /// y[i, r] += Σ_j x[i, cols[j]] · w[r, j] for n rows of x (width k) into y (width rows).
    pub fn add_product(&self, x: &[f32], n: usize, k: usize, y: &mut [f32], rows: usize) {
        let no = self.cols.len();
        for i in 0..n {
            let xo: Vec<f32> = self.cols.iter().map(|&c| x[i * k + c]).collect();
            for (r, yr) in y[i * rows..(i + 1) * rows].iter_mut().enumerate() {
                *yr += xo.iter().zip(&self.w[r * no..(r + 1) * no]).map(|(a, b)| a * b).sum::<f32>();
            }
        }
    }
}

impl Matrix {
    pub fn new(dtype: DType, rows: usize, cols: usize, bytes: Bytes) -> Result<Self> {
        let expected = dtype.row_bytes(cols)? * rows;
        let got = bytes.as_slice().len();
        if got != expected {
            bail!("{rows}×{cols} {} matrix needs {expected} bytes, got {got}", dtype.name());
        }
        Ok(Matrix { dtype, rows, cols, bytes, outliers: None, row_scale: None, packed: None })
    }

    /// Attaches the scales of an I8/F8E4M3 matrix (`rows` of them, or one per tensor).
    pub fn with_row_scale(mut self, scale: Vec<f32>) -> Result<Self> {
        if !self.dtype.needs_row_scale() {
            bail!("a {} matrix takes no row scales", self.dtype.name());
        }
        if scale.len() != self.rows && scale.len() != 1 {
            bail!("{} scales for a matrix of {} rows (need one per row, or one)", scale.len(), self.rows);
        }
        if let Some(s) = scale.iter().find(|s| !s.is_finite()) {
            bail!("row scale {s} is not finite");
        }
        self.row_scale = Some(Arc::new(scale));
        Ok(self)
    }

    /// The scale of row `r` (1 without scales).
    pub fn scale_of(&self, r: usize) -> f32 {
        self.row_scale.as_ref().map_or(1.0, |s| if s.len() == 1 { s[0] } else { s[r] })
    }

    pub fn data(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// The first `n` rows (a window of the same map where the bytes are mapped; unpacked).
    pub fn first_rows(&self, n: usize) -> Result<Matrix> {
        if n == 0 || n > self.rows {
            bail!("cannot keep {n} of a matrix's {} rows", self.rows);
        }
        let len = self.dtype.row_bytes(self.cols)? * n;
        let bytes = match &self.bytes {
            Bytes::Mapped { map, offset, .. } => Bytes::Mapped { map: map.clone(), offset: *offset, len },
            Bytes::Owned(v) => Bytes::Owned(Arc::new(v[..len].to_vec())),
        };
        let mut m = Matrix::new(self.dtype, n, self.cols, bytes)?;
        m.row_scale =
            self.row_scale.as_ref().map(|s| Arc::new(if s.len() == 1 { s.to_vec() } else { s[..n].to_vec() }));
        m.outliers = self
            .outliers
            .as_ref()
            .map(|o| Arc::new(Outliers { cols: o.cols.clone(), w: o.w[..n * o.cols.len()].to_vec() }));
        Ok(m)
    }

    /// Adds the packed copy when this CPU has kernels for it (once). A mapped matrix's pages
    /// are then handed back to the kernel: products read only the packed copy, so keeping both
    /// resident would double the memory (rows read later, e.g. embedding lookups of a tied
    /// head, are paged in again from the file).
    pub fn pack_for_cpu(&mut self) -> Result<()> {
        if self.packed.is_some() || !crate::kernels::packing_supported(self.dtype) {
            return Ok(());
        }
        self.packed = Some(Arc::new(PackedMatrix::pack(self.dtype, self.data(), self.rows, self.cols)?));
        self.bytes.release_pages();
        Ok(())
    }

    /// One row as f32 (embedding lookup).
    pub fn row_f32(&self, row: usize, out: &mut [f32]) -> Result<()> {
        let rb = self.dtype.row_bytes(self.cols)?;
        crate::kernels::dequantize_row(self.dtype, &self.data()[row * rb..(row + 1) * rb], out)?;
        if self.row_scale.is_some() {
            let s = self.scale_of(row);
            out.iter_mut().for_each(|v| *v *= s);
        }
        Ok(())
    }

    /// Attaches outlier columns (the stored matrix must hold zeros in them).
    pub fn with_outliers(mut self, o: Outliers) -> Result<Self> {
        if o.w.len() != self.rows * o.cols.len() {
            bail!("outlier weights: {} values for {} rows × {} columns", o.w.len(), self.rows, o.cols.len());
        }
        let mut seen = vec![false; self.cols];
        for &c in &o.cols {
            if c >= self.cols || std::mem::replace(&mut seen[c], true) {
                bail!("outlier column {c} is out of range or repeated (matrix of {} columns)", self.cols);
            }
        }
        self.outliers = Some(Arc::new(o));
        Ok(self)
    }

    pub fn n_bytes(&self) -> usize {
        self.data().len()
            + self.outliers.as_ref().map_or(0, |o| 4 * (o.w.len() + o.cols.len()))
            + self.row_scale.as_ref().map_or(0, |s| 4 * s.len())
    }

    /// The same matrix as owned f32 (the full-precision baseline of a quantized model).
    /// The matrix in f32, outlier columns included.
    pub fn to_f32(&self) -> Result<Matrix> {
        if self.dtype == DType::F32 && self.outliers.is_none() {
            return Ok(self.clone());
        }
        let mut values = vec![0f32; self.rows * self.cols];
        for (r, row) in values.chunks_exact_mut(self.cols).enumerate() {
            self.row_f32(r, row)?;
            if let Some(o) = &self.outliers {
                for (j, &c) in o.cols.iter().enumerate() {
                    row[c] = o.w[r * o.cols.len() + j];
                }
            }
        }
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Matrix::new(DType::F32, self.rows, self.cols, Bytes::Owned(Arc::new(bytes)))
    }
}

#[derive(Clone)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    /// q, k, v biases (Qwen2).
    pub qkv_bias: Option<[Vec<f32>; 3]>,
    pub wo: Matrix,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Matrix,
    pub w_up: Matrix,
    pub w_down: Matrix,
}

/// Where a file format keeps each tensor: per-layer names are `layer_prefix(i)` + suffix.
pub struct TensorNames {
    pub layer_prefix: fn(usize) -> String,
    pub attn_norm: &'static str,
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    pub q_bias: &'static str,
    pub k_bias: &'static str,
    pub v_bias: &'static str,
    pub o: &'static str,
    pub ffn_norm: &'static str,
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
    pub embed: &'static str,
    pub out_norm: &'static str,
    pub lm_head: &'static str,
}

#[derive(Clone)]
pub struct ModelWeights {
    pub config: ModelConfig,
    pub embed: Matrix,
    pub layers: Vec<LayerWeights>,
    pub out_norm: Vec<f32>,
    /// None when tied to the embedding.
    pub lm_head: Option<Matrix>,
}

impl ModelWeights {
    /// Collects every tensor the config calls for through a source's getters (which name the
    /// missing tensor in their error), then validates the shapes.
    pub fn assemble(
        config: ModelConfig,
        names: &TensorNames,
        matrix: impl Fn(&str) -> Result<Matrix>,
        vector: impl Fn(&str) -> Result<Vec<f32>>,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let prefix = (names.layer_prefix)(i);
            let p = |suffix: &str| format!("{prefix}{suffix}");
            let qkv_bias = if config.qkv_bias {
                Some([vector(&p(names.q_bias))?, vector(&p(names.k_bias))?, vector(&p(names.v_bias))?])
            } else {
                None
            };
            layers.push(LayerWeights {
                attn_norm: vector(&p(names.attn_norm))?,
                wq: matrix(&p(names.q))?,
                wk: matrix(&p(names.k))?,
                wv: matrix(&p(names.v))?,
                qkv_bias,
                wo: matrix(&p(names.o))?,
                ffn_norm: vector(&p(names.ffn_norm))?,
                w_gate: matrix(&p(names.gate))?,
                w_up: matrix(&p(names.up))?,
                w_down: matrix(&p(names.down))?,
            });
        }
        let weights = ModelWeights {
            embed: matrix(names.embed)?,
            out_norm: vector(names.out_norm)?,
            lm_head: if config.tied_embeddings { None } else { Some(matrix(names.lm_head)?) },
            layers,
            config,
        };
        weights.validate()?;
        Ok(weights)
    }

    /// Every matrix dequantized to f32: the float32 path a reference implementation runs.
    pub fn dequantized(&self) -> Result<ModelWeights> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(LayerWeights {
                    attn_norm: l.attn_norm.clone(),
                    wq: l.wq.to_f32()?,
                    wk: l.wk.to_f32()?,
                    wv: l.wv.to_f32()?,
                    qkv_bias: l.qkv_bias.clone(),
                    wo: l.wo.to_f32()?,
                    ffn_norm: l.ffn_norm.clone(),
                    w_gate: l.w_gate.to_f32()?,
                    w_up: l.w_up.to_f32()?,
                    w_down: l.w_down.to_f32()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelWeights {
            config: self.config.clone(),
            embed: self.embed.to_f32()?,
            layers,
            out_norm: self.out_norm.clone(),
            lm_head: self.lm_head.as_ref().map(Matrix::to_f32).transpose()?,
        })
    }

    pub fn lm_head(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Packs every matrix the decoder multiplies (layers and head) for this CPU's kernels, on
    /// every core (packing a 1.5B model takes seconds on one).
    pub fn pack_for_cpu(&mut self) -> Result<()> {
        let mut todo: Vec<&mut Matrix> = Vec::new();
        for l in &mut self.layers {
            todo.extend([&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.w_gate, &mut l.w_up, &mut l.w_down]);
        }
        todo.push(match &mut self.lm_head {
            Some(head) => head,
            None => &mut self.embed,
        });
        // Popped largest first, so the threads finish together.
        todo.sort_by_key(|m| m.data().len());
        let todo = std::sync::Mutex::new(todo);
        let n_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..n_threads)
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        loop {
                            let next = todo.lock().unwrap_or_else(|e| e.into_inner()).pop();
                            match next {
                                Some(m) => m.pack_for_cpu()?,
                                None => return Ok(()),
                            }
                        }
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|w| w.join().expect("packing thread panicked"))
        })
    }

    /// Checks every shape against the config, so a bad file fails at load, not mid-forward.
    pub fn validate(&self) -> Result<()> {
        let c = &self.config;
        let q = c.n_heads * c.head_dim;
        let kv = c.n_kv_heads * c.head_dim;
        let check = |name: &str, m: &Matrix, rows: usize, cols: usize| -> Result<()> {
            if m.rows != rows || m.cols != cols {
                bail!("{name}: shape {}×{}, expected {rows}×{cols}", m.rows, m.cols);
            }
            Ok(())
        };
        let vec_len = |name: &str, v: &[f32], n: usize| -> Result<()> {
            if v.len() != n {
                bail!("{name}: length {}, expected {n}", v.len());
            }
            Ok(())
        };
        check("embedding", &self.embed, c.vocab_size, c.hidden)?;
        check("lm head", self.lm_head(), c.vocab_size, c.hidden)?;
        vec_len("output norm", &self.out_norm, c.hidden)?;
        if self.layers.len() != c.n_layers {
            bail!("{} layers loaded, config says {}", self.layers.len(), c.n_layers);
        }
        for (i, l) in self.layers.iter().enumerate() {
            let n = |s: &str| format!("layer {i} {s}");
            vec_len(&n("attn norm"), &l.attn_norm, c.hidden)?;
            vec_len(&n("ffn norm"), &l.ffn_norm, c.hidden)?;
            check(&n("q"), &l.wq, q, c.hidden)?;
            check(&n("k"), &l.wk, kv, c.hidden)?;
            check(&n("v"), &l.wv, kv, c.hidden)?;
            check(&n("o"), &l.wo, c.hidden, q)?;
            check(&n("gate"), &l.w_gate, c.ffn_hidden, c.hidden)?;
            check(&n("up"), &l.w_up, c.ffn_hidden, c.hidden)?;
            check(&n("down"), &l.w_down, c.hidden, c.ffn_hidden)?;
            if let Some([bq, bk, bv]) = &l.qkv_bias {
                vec_len(&n("q bias"), bq, q)?;
                vec_len(&n("k bias"), bk, kv)?;
                vec_len(&n("v bias"), bv, kv)?;
            } else if c.qkv_bias {
                bail!("layer {i}: missing q/k/v bias");
            }
        }
        Ok(())
    }

    /// Bytes of weights read for one decode step (every matrix once; the embedding row is negligible).
    pub fn bytes_per_token(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down].iter().map(|m| m.n_bytes()).sum::<usize>()
            })
            .sum();
        layers + self.lm_head().n_bytes()
    }

    pub fn total_bytes(&self) -> usize {
        self.bytes_per_token() + if self.lm_head.is_some() { self.embed.n_bytes() } else { 0 }
    }
}

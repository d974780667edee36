// tern's CUDA kernels. Compiled by build.rs with nvcc into one fatbin (SASS for the target
// GPU + PTX), loaded once per process. Every kernel has a plain CPU reference in
// cuda/tests.rs (or the CPU decoder) that its test compares against on random inputs.
//
// Conventions: activations are f32 (q8 as the input of quantized matrix-vector products),
// weights bf16 or GGUF blocks, the KV cache is bf16.
// The paged KV cache is one arena of blocks; block b of layer l holds K then V, each laid out
// [kv_head][block_size][head_dim], so one head's keys of a block are contiguous.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

typedef __nv_bfloat16 bf16;

#define WARP 32

// Programmatic dependent launch (Hopper): the host launches each kernel so that it may start
// while the previous one finishes; every kernel first waits for its predecessor's results
// (griddepcontrol.wait, a no-op without the launch attribute), then lets its own successor
// start launching. This hides most of the gap between the many small kernels of a decode step.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_ENTRY()                                       \
  asm volatile("griddepcontrol.wait;\n" ::: "memory");   \
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory")
#else
#define PDL_ENTRY()
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block; every thread gets the result. `red` holds one float per warp.
__device__ float block_sum(float v, float* red) {
  int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = (blockDim.x + WARP - 1) / WARP;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[w] = v;
  __syncthreads();
  float t = 0.f;
  for (int i = 0; i < nw; i++) t += red[i];
  return t;
}

__device__ __forceinline__ void bf16x8_to_f32(uint4 u, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ------------------------------------------------------------------------------------------
// Elementwise and row kernels

// x[i, :] = embed[tokens[i], :] (bf16 table), for n rows of width d.
extern "C" __global__ void embed_bf16(const bf16* __restrict__ table, const int* __restrict__ tokens,
                                      float* __restrict__ x, int n, int d) {
  PDL_ENTRY();
  int i = blockIdx.x;
  if (i >= n) return;
  const bf16* row = table + (size_t)tokens[i] * d;
  for (int j = threadIdx.x; j < d; j += blockDim.x) x[(size_t)i * d + j] = __bfloat162float(row[j]);
}

// Activations for the quantized matrix-vector products: int8 values in groups of 32 with a
// scale d = max|x| / 127 and d · (sum of the group's int8 values), as llama.cpp's q8_1, so the
// products run on dp4a. The warp holds one group (element e at lane e % 32).
__device__ __forceinline__ void put_q8(float v, size_t e, int8_t* __restrict__ xq, float2* __restrict__ xds) {
  float amax = warp_max(fabsf(v));
  float d = amax / 127.f;
  int q = amax > 0.f ? __float2int_rn(v / d) : 0;
  int sum = q;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  xq[e] = (int8_t)q;
  if (e % WARP == 0) xds[e / WARP] = make_float2(d, d * (float)sum);
}

// Where a row kernel writes its output: f32, bf16 (GEMM input) or q8 (quantized GEMV input).
enum OutKind { OUT_F32 = 0, OUT_BF16 = 1, OUT_Q8 = 2 };

// f32 or bf16 only: for kernels whose warps do not hold whole q8 groups.
__device__ __forceinline__ void put_plain(int kind, void* out, size_t e, float y) {
  if (kind == OUT_BF16)
    ((bf16*)out)[e] = __float2bfloat16(y);
  else
    ((float*)out)[e] = y;
}

__device__ __forceinline__ void put_out(int kind, void* out, float2* xds, size_t e, float y) {
  if (kind == OUT_Q8)
    put_q8(y, e, (int8_t*)out, xds);
  else if (kind == OUT_BF16)
    ((bf16*)out)[e] = __float2bfloat16(y);
  else
    ((float*)out)[e] = y;
}

// out[i, :] = x[i, :] * rsqrt(mean(x[i, :]^2) + eps) * w, in the output kind (q8 needs d % 32
// == 0 and a multiple of 32 threads, so each warp holds whole groups).
// Row i of the output reads input row rows[i] when `rows` is given (logit rows), else row i.
// One block per row; a thread keeps its (up to 8) values in registers between the two passes,
// so a row is read from memory once.
#define NORM_VALS 8
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    const int* __restrict__ rows, void* __restrict__ out, float2* __restrict__ xds,
                                    int kind, int d, float eps) {
  // The weights do not depend on the previous kernel: their loads start before waiting on it.
  float wv[NORM_VALS];
#pragma unroll
  for (int e = 0; e < NORM_VALS; e++) {
    int j = threadIdx.x + e * blockDim.x;
    wv[e] = j < d ? w[j] : 0.f;
  }
  PDL_ENTRY();
  __shared__ float red[32];
  int i = blockIdx.x;
  int src = rows ? rows[i] : i;
  const float* xr = x + (size_t)src * d;
  float v[NORM_VALS];
  float ss = 0.f;
#pragma unroll
  for (int e = 0; e < NORM_VALS; e++) {
    int j = threadIdx.x + e * blockDim.x;
    v[e] = j < d ? xr[j] : 0.f;
    ss += v[e] * v[e];
  }
  for (int j = threadIdx.x + NORM_VALS * blockDim.x; j < d; j += blockDim.x) ss += xr[j] * xr[j];
  float inv = rsqrtf(block_sum(ss, red) / d + eps);
#pragma unroll
  for (int e = 0; e < NORM_VALS; e++) {
    int j = threadIdx.x + e * blockDim.x;
    if (j < d) put_out(kind, out, xds, (size_t)i * d + j, v[e] * inv * wv[e]);
  }
  for (int j = threadIdx.x + NORM_VALS * blockDim.x; j < d; j += blockDim.x)
    put_out(kind, out, xds, (size_t)i * d + j, xr[j] * inv * w[j]);
}

// act[i, j] = silu(gu[i, j]) * gu[i, f + j], in the output kind: gu rows are [gate f | up f],
// f32 or (gu_bf16, the GEMM's output) bf16. Grid (f / (256 · per) rounded up, n), no 64-bit
// division per element. per = 8 (bf16 in and out, f % 8 == 0: the GEMM path) moves 16 bytes per
// load and store; per = 1 otherwise, where with f % 32 == 0 (q8) every warp is wholly inside
// the row or past it and holds one group.
__device__ __forceinline__ float silu(float g) { return g / (1.f + __expf(-g)); }

extern "C" __global__ void silu_mul(const void* __restrict__ gu, int gu_bf16, void* __restrict__ act,
                                    float2* __restrict__ xds, int kind, int f, int per) {
  PDL_ENTRY();
  int i = blockIdx.y, j = (blockIdx.x * blockDim.x + threadIdx.x) * per;
  if (j >= f) return;
  size_t at = (size_t)i * 2 * f + j;
  if (per == 8) {
    float g[8], u[8];
    bf16x8_to_f32(*reinterpret_cast<const uint4*>((const bf16*)gu + at), g);
    bf16x8_to_f32(*reinterpret_cast<const uint4*>((const bf16*)gu + at + f), u);
    uint4 o;
    uint32_t* op = reinterpret_cast<uint32_t*>(&o);
#pragma unroll
    for (int e = 0; e < 4; e++) op[e] = pack_bf16(silu(g[2 * e]) * u[2 * e], silu(g[2 * e + 1]) * u[2 * e + 1]);
    *reinterpret_cast<uint4*>((bf16*)act + (size_t)i * f + j) = o;
    return;
  }
  float g, u;
  if (gu_bf16) {
    g = __bfloat162float(((const bf16*)gu)[at]);
    u = __bfloat162float(((const bf16*)gu)[at + f]);
  } else {
    g = ((const float*)gu)[at];
    u = ((const float*)gu)[at + f];
  }
  put_out(kind, act, xds, (size_t)i * f + j, silu(g) * u);
}

// q8 activations of n rows of k values (row stride ldx), written densely [n][k].
extern "C" __global__ void quantize_q8(const float* __restrict__ x, int ldx, int8_t* __restrict__ xq,
                                       float2* __restrict__ xds, int n, int k) {
  PDL_ENTRY();
  size_t total = (size_t)n * k;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x)
    put_q8(x[(e / k) * ldx + e % k], e, xq, xds);
}

// ------------------------------------------------------------------------------------------
// Matrix-vector products for a few activation rows: y[i, r] (+)= dot(W[r, :], x[i, :]).
// Weights are read once for all N rows. A row group (GEMV_ROWS consecutive weight rows) is
// owned by WS warps that split the row in 16-byte pieces, so each warp load is a contiguous
// 512 bytes; WS = 4 gives matrices with few, long rows (down of a 7B model; q/k/v and o too in
// bf16) four times the warps, where a row has two pieces per lane (cuda/ops.rs decides). Each lane issues the codec's UNROLL pieces of every row before using any,
// so enough bytes are in flight to cover memory latency. `accumulate` adds into y (the
// residual stream). Activations (a few KB per row) are read through L1 by every warp: f32
// for bf16 weights, q8 for quantized weights, whose products are integer (dp4a) per group of
// 32 — converting every weight to float would make the kernel arithmetic-bound.

#define GEMV_ROWS 2
#define GEMV_WARPS 4
#define GEMV_THREADS (GEMV_WARPS * WARP)

struct GemvArgs {
  const float* x;  // f32 inputs (bf16 weights), row stride ldx
  int ldx;
  const int8_t* xq;   // q8 inputs (quantized weights), [n][k]
  const float2* xds;  // their (scale, scale · sum) per 32, [n][k / 32]
  float* y;
  int ldy;
  int rows;
  int k;
  int accumulate;
};

// 8 input values of row i at columns c..c+8.
__device__ __forceinline__ void gemv_input8(const GemvArgs& a, int i, int c, float* v) {
  const float* xr = a.x + (size_t)i * a.ldx;
  float4 p0 = *reinterpret_cast<const float4*>(xr + c), p1 = *reinterpret_cast<const float4*>(xr + c + 4);
  v[0] = p0.x; v[1] = p0.y; v[2] = p0.z; v[3] = p0.w; v[4] = p1.x; v[5] = p1.y; v[6] = p1.z; v[7] = p1.w;
}

// The row group's sums (over the lanes and the WS warps) into y.
template <int N, int WS>
__device__ __forceinline__ void gemv_store(const GemvArgs& a, int r0, float (&acc)[N][GEMV_ROWS]) {
  __shared__ float part[GEMV_WARPS * N * GEMV_ROWS];
  int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
#pragma unroll
  for (int i = 0; i < N; i++)
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
      float v = warp_sum(acc[i][r]);
      if (WS == 1) {
        if (lane == 0 && r0 + r < a.rows) {
          float* y = a.y + (size_t)i * a.ldy + r0 + r;
          *y = a.accumulate ? *y + v : v;
        }
      } else if (lane == 0) {
        part[w * N * GEMV_ROWS + i * GEMV_ROWS + r] = v;
      }
    }
  if (WS > 1) {
    __syncthreads();
    for (int o = threadIdx.x; o < N * GEMV_ROWS; o += blockDim.x) {
      int i = o / GEMV_ROWS, r = o % GEMV_ROWS;
      float v = 0.f;
      for (int q = 0; q < WS; q++) v += part[q * N * GEMV_ROWS + o];
      if (r0 + r < a.rows) {
        float* y = a.y + (size_t)i * a.ldy + r0 + r;
        *y = a.accumulate ? *y + v : v;
      }
    }
  }
}

// The loop shared by the encodings. A codec reads one piece of a row (PIECE values) into a
// register type W (`load`) and adds the pieces of the GEMV_ROWS rows · x row i (`dot`).
template <class Codec, int N, int WS>
__device__ void gemv_impl(const Codec cd, GemvArgs a) {
  typedef typename Codec::W W;
  PDL_ENTRY();
  int lane = threadIdx.x % WARP, sub = (threadIdx.x / WARP) % WS;
  int g = blockIdx.x * (GEMV_WARPS / WS) + (threadIdx.x / WARP) / WS;
  int r0 = g * GEMV_ROWS;
  if (WS == 1 && r0 >= a.rows) return;  // (with WS > 1 a block's warps share one group)
  float acc[N][GEMV_ROWS] = {};
  int pieces = a.k / Codec::PIECE, stride = WARP * WS;
  for (int c0 = sub * WARP + lane; c0 < pieces; c0 += Codec::UNROLL * stride) {
    W wq[Codec::UNROLL][GEMV_ROWS];
#pragma unroll
    for (int u = 0; u < Codec::UNROLL; u++) {
      int c = min(c0 + u * stride, pieces - 1);
#pragma unroll
      for (int r = 0; r < GEMV_ROWS; r++) wq[u][r] = cd.load(a, min(r0 + r, a.rows - 1), c);
    }
#pragma unroll
    for (int u = 0; u < Codec::UNROLL; u++) {
      int c = c0 + u * stride;
      if (c >= pieces) break;
#pragma unroll
      for (int i = 0; i < N; i++) cd.dot(a, i, c, wq[u], acc[i]);
    }
  }
  gemv_store<N, WS>(a, r0, acc);
}

struct Bf16Codec {
  typedef uint4 W;
  static const int PIECE = 8, UNROLL = 8;
  const bf16* w;
  __device__ __forceinline__ W load(const GemvArgs& a, int row, int c) const {
    return __ldcs(reinterpret_cast<const uint4*>(w + (size_t)row * a.k) + c);
  }
  __device__ __forceinline__ void dot(const GemvArgs& a, int i, int c, const W* wq, float* acc) const {
    float xv[8];
    gemv_input8(a, i, c * 8, xv);
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
      float wf[8];
      bf16x8_to_f32(wq[r], wf);
#pragma unroll
      for (int e = 0; e < 8; e++) acc[r] = fmaf(wf[e], xv[e], acc[r]);
    }
  }
};

// Q8_0 in tern's GPU layout: int8 quants [rows][k] and f16 scales [rows][k / 32]; a piece is
// 16 quants (half a block).
struct Q8Piece {
  int4 q;
  float d;
};

struct Q8Codec {
  typedef Q8Piece W;
  static const int PIECE = 16, UNROLL = 8;
  const int8_t* qs;
  const __half* d;
  __device__ __forceinline__ W load(const GemvArgs& a, int row, int c) const {
    W p;
    p.q = __ldcs(reinterpret_cast<const int4*>(qs + (size_t)row * a.k) + c);
    p.d = __half2float(d[(size_t)row * (a.k / 32) + c / 2]);
    return p;
  }
  __device__ __forceinline__ void dot(const GemvArgs& a, int i, int c, const W* wq, float* acc) const {
    int4 xv = *reinterpret_cast<const int4*>(a.xq + (size_t)i * a.k + c * 16);
    float xd = a.xds[(size_t)i * (a.k / 32) + c / 2].x;
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
      int t = __dp4a(wq[r].q.x, xv.x, 0);
      t = __dp4a(wq[r].q.y, xv.y, t);
      t = __dp4a(wq[r].q.z, xv.z, t);
      t = __dp4a(wq[r].q.w, xv.w, t);
      acc[r] = fmaf(wq[r].d * xd, (float)t, acc[r]);
    }
  }
};

// GGUF Q4_K: blocks of 256 values, 144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales and
// mins for 8 sub-blocks of 32, then 128 bytes of nibbles (bytes 32j..32j+31 hold sub-block 2j
// in their low and 2j+1 in their high nibbles). value = d * sc * q - dmin * m.
__device__ __forceinline__ void q4k_scale_min(const uint8_t* s, int j, float* sc, float* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// The scales and mins of sub-blocks 2j and 2j+1 (j = 0..3) as byte pairs (2j in the low byte),
// from the 12 scale bytes held in three registers (s0 = bytes 0..3, ...). Branch-free: the
// lanes of a warp hold different j, and a branch on it made each lane run both decodes.
__device__ __forceinline__ void q4k_pair_scales(uint32_t s0, uint32_t s1, uint32_t s2, int j, uint32_t* sc,
                                                uint32_t* m) {
  int sh = 16 * (j & 1);
  uint32_t a0 = (s0 >> sh) & 0xFFFF, a1 = (s1 >> sh) & 0xFFFF, a2 = (s2 >> sh) & 0xFFFF;
  bool low = j < 2;  // sub-blocks 0..3: 6 bits in bytes s and s + 4; 4..7: a nibble and 2 high bits
  *sc = low ? a0 & 0x3F3F : (a2 & 0x0F0F) | ((a0 >> 2) & 0x3030);
  *m = low ? a1 & 0x3F3F : ((a2 >> 4) & 0x0F0F) | ((a1 >> 2) & 0x3030);
}

// A piece of a Q4_K block: the 32 bytes of nibbles of sub-blocks 2j (low nibbles) and 2j+1
// (high nibbles), 64 values, with the block's 16-byte header (d, dmin, scales). Whole pairs per
// lane decode each pair's scales once for 64 values: the kernel issues about a third fewer
// instructions than with 16-byte pieces, and it was issue-bound as much as latency-bound.
struct Q4KPiece {
  uint4 q0, q1;
  uint4 hdr;
};

struct Q4KCodec {
  typedef Q4KPiece W;
  static const int PIECE = 64, UNROLL = 2;
  const uint8_t* w;
  __device__ __forceinline__ W load(const GemvArgs& a, int row, int c) const {
    const uint8_t* blk = w + ((size_t)row * (a.k / 256) + c / 4) * 144;
    const uint4* q = reinterpret_cast<const uint4*>(blk + 16 + (c % 4) * 32);
    W p;
    p.q0 = __ldcs(q);
    p.q1 = __ldcs(q + 1);
    p.hdr = __ldg(reinterpret_cast<const uint4*>(blk));
    return p;
  }
  __device__ __forceinline__ void dot(const GemvArgs& a, int i, int c, const W* wq, float* acc) const {
    int j = c % 4;
    int col_lo = (c / 4) * 256 + j * 64;  // the 32 values of sub-block 2j; 2j+1 follows
    const int4* xr = reinterpret_cast<const int4*>(a.xq + (size_t)i * a.k + col_lo);
    const int4 xl0 = xr[0], xl1 = xr[1], xh0 = xr[2], xh1 = xr[3];
    const float4 ds = *reinterpret_cast<const float4*>(a.xds + (size_t)i * (a.k / 32) + col_lo / 32);
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
      const float2 dm = __half22float2(*reinterpret_cast<const __half2*>(&wq[r].hdr.x));
      uint32_t sc, mn;
      q4k_pair_scales(wq[r].hdr.y, wq[r].hdr.z, wq[r].hdr.w, j, &sc, &mn);
      const uint4 q0 = wq[r].q0, q1 = wq[r].q1;
      const uint32_t m4 = 0x0F0F0F0Fu;
      int tl = __dp4a((int)(q0.x & m4), xl0.x, 0), th = __dp4a((int)((q0.x >> 4) & m4), xh0.x, 0);
      tl = __dp4a((int)(q0.y & m4), xl0.y, tl);
      th = __dp4a((int)((q0.y >> 4) & m4), xh0.y, th);
      tl = __dp4a((int)(q0.z & m4), xl0.z, tl);
      th = __dp4a((int)((q0.z >> 4) & m4), xh0.z, th);
      tl = __dp4a((int)(q0.w & m4), xl0.w, tl);
      th = __dp4a((int)((q0.w >> 4) & m4), xh0.w, th);
      tl = __dp4a((int)(q1.x & m4), xl1.x, tl);
      th = __dp4a((int)((q1.x >> 4) & m4), xh1.x, th);
      tl = __dp4a((int)(q1.y & m4), xl1.y, tl);
      th = __dp4a((int)((q1.y >> 4) & m4), xh1.y, th);
      tl = __dp4a((int)(q1.z & m4), xl1.z, tl);
      th = __dp4a((int)((q1.z >> 4) & m4), xh1.z, th);
      tl = __dp4a((int)(q1.w & m4), xl1.w, tl);
      th = __dp4a((int)((q1.w >> 4) & m4), xh1.w, th);
      // ds = (d, d · sum) of the two activation groups: the mins multiply the sums.
      float v = dm.x * (ds.x * (float)(tl * (int)(sc & 0xFF)) + ds.z * (float)(th * (int)(sc >> 8)));
      v -= dm.y * (ds.y * (float)(mn & 0xFF) + ds.w * (float)(mn >> 8));
      acc[r] += v;
    }
  }
};

// One entry point per row count and split. One row (batch-1 decode) fits in 64 registers
// without spilling, which lets 8 blocks share an SM instead of 7 (more loads in flight).
#define GEMV_ENTRY_WS(name, impl, params, call, WS)                                                       \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 8) name##_1_##WS params { gemv_impl<impl, 1, WS> call; } \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS) name##_2_##WS params { gemv_impl<impl, 2, WS> call; } \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS) name##_3_##WS params { gemv_impl<impl, 3, WS> call; } \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS) name##_4_##WS params { gemv_impl<impl, 4, WS> call; } \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS) name##_5_##WS params { gemv_impl<impl, 5, WS> call; } \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS) name##_6_##WS params { gemv_impl<impl, 6, WS> call; } \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS) name##_7_##WS params { gemv_impl<impl, 7, WS> call; } \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS) name##_8_##WS params { gemv_impl<impl, 8, WS> call; }
#define GEMV_ENTRY(name, impl, params, call) \
  GEMV_ENTRY_WS(name, impl, params, call, 1) \
  GEMV_ENTRY_WS(name, impl, params, call, 4)

GEMV_ENTRY(gemv_bf16, Bf16Codec, (const bf16* w, GemvArgs a), (Bf16Codec{w}, a))
GEMV_ENTRY(gemv_q8_0, Q8Codec, (const int8_t* qs, const __half* d, GemvArgs a), (Q8Codec{qs, d}, a))
GEMV_ENTRY(gemv_q4_k, Q4KCodec, (const uint8_t* w, GemvArgs a), (Q4KCodec{w}, a))

// ------------------------------------------------------------------------------------------
// Dequantization to bf16 (the GEMM path of quantized weights).

extern "C" __global__ void dequant_q8_0_bf16(const int8_t* __restrict__ qs, const __half* __restrict__ d,
                                             bf16* __restrict__ out, size_t n) {
  PDL_ENTRY();
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x)
    out[e] = __float2bfloat16(__half2float(d[e / 32]) * qs[e]);
}

extern "C" __global__ void dequant_q4_k_bf16(const uint8_t* __restrict__ w, bf16* __restrict__ out, size_t n) {
  PDL_ENTRY();
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
    size_t b = e / 256;
    int t = e % 256, j = t / 32, l = t % 32;
    const uint8_t* blk = w + b * 144;
    float d = __half2float(*reinterpret_cast<const __half*>(blk));
    float dmin = __half2float(*reinterpret_cast<const __half*>(blk + 2));
    float sc, mn;
    q4k_scale_min(blk + 4, j, &sc, &mn);
    uint8_t byte = blk[16 + (j / 2) * 32 + l];
    int q = (j % 2) ? byte >> 4 : byte & 0xF;
    out[e] = __float2bfloat16(d * sc * q - dmin * mn);
  }
}

// ------------------------------------------------------------------------------------------
// Rotary embedding, q/k/v bias and the KV-cache write, fused. qkv rows hold [q | k | v]
// (n_heads*hd, then n_kv*hd twice). cos/sin come from tables [position][hd/2] computed on the
// host as the CPU decoder computes them (f32 angle, then cos and sin), so rotations agree and
// no slow large-argument sincos runs here. Tokens with slot < 0 are padding and are skipped.
// style 0: rotate halves (x[i], x[i + hd/2]); style 1: adjacent pairs (x[2i], x[2i+1]).

// Grid (token, group of ROPE_HEADS heads of q | k | v), (hd/2 rounded up to a warp) ×
// ROPE_HEADS threads: each thread owns one rotation pair. Several heads per block keep a
// 128-token step's blocks within one wave.
extern "C" __global__ void rope_kv_write(float* __restrict__ qkv, const float* __restrict__ bias,
                                         const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                         const int* __restrict__ pos, const int* __restrict__ slot,
                                         bf16* __restrict__ kv_layer, int n_heads, int n_kv, int hd, int style,
                                         int block_size, size_t block_stride) {
  PDL_ENTRY();
  int i = blockIdx.x, head = blockIdx.y * blockDim.y + threadIdx.y, f = threadIdx.x;
  if (slot[i] < 0 || f >= hd / 2 || head >= n_heads + 2 * n_kv) return;
  int qd = n_heads * hd, kvd = n_kv * hd, half = hd / 2;
  float* x = qkv + (size_t)i * (qd + 2 * kvd) + head * hd;  // k heads follow q heads, then v heads
  const float* bx = bias ? bias + head * hd : nullptr;
  int a = style == 0 ? f : 2 * f, b = style == 0 ? f + half : 2 * f + 1;
  float x0 = x[a], x1 = x[b];
  if (bx) {
    x0 += bx[a];
    x1 += bx[b];
  }
  bool is_v = head >= n_heads + n_kv;
  if (!is_v) {
    float c = cos_t[(size_t)pos[i] * half + f], s = sin_t[(size_t)pos[i] * half + f];
    float r0 = x0 * c - x1 * s, r1 = x0 * s + x1 * c;
    x0 = r0;
    x1 = r1;
  }
  x[a] = x0;
  x[b] = x1;
  if (head < n_heads) return;
  // K or V head: store into the cache block.
  int kvh = is_v ? head - n_heads - n_kv : head - n_heads;
  int blk = slot[i] / block_size, off = slot[i] % block_size;
  bf16* base = kv_layer + (size_t)blk * block_stride + (is_v ? (size_t)block_size * kvd : 0);
  bf16* dst = base + ((size_t)kvh * block_size + off) * hd;
  dst[a] = __float2bfloat16(x0);
  dst[b] = __float2bfloat16(x1);
}

// ------------------------------------------------------------------------------------------
// Attention over the paged cache, split-K ("flash decoding"): one block per (query token,
// group of `heads` query heads of one KV head, split of the keys). Each of the 4 warps walks
// tiles of 32 keys with an online softmax: lane j scores key j of the tile for the group's
// heads (the whole key row in flight at once), then the warp accumulates P·V with each V row
// read as one coalesced piece (all 32 rows of the tile in flight). The warps' partial results
// are merged in shared memory; with several splits the block writes unnormalized partials (and
// max, sum) that attn_combine merges.
//
// A warp's work per tile grows with its group, so few sequences take one head per block (more
// blocks, short dependency chains; the heads of a KV head share its rows through L1/L2) and
// many take all G heads of the KV head (each row read once for all of them).
// Keys per split: at least `split`, and enough that `n_splits` splits cover the sequence, so
// a captured graph stays valid as its sequences grow.

#define ATT_THREADS 128
#define ATT_WARPS 4
#define MAX_GROUP 16

struct AttnArgs {
  const float* q;  // qkv buffer: query heads at the start of each row
  int q_ld;
  const bf16* kv_layer;  // block 0 of this layer
  size_t block_stride;   // elements between consecutive blocks (all layers)
  const int* tables;     // [n_seqs][max_blocks]
  int max_blocks;
  const int* tok_seq;
  const int* tok_pos;   // -1: padding
  const int* tok_list;  // the tokens of block rows 0.. (null: token i is block row i)
  int n_heads, n_kv, hd, block_size;
  int heads;   // query heads per block: 1 or n_heads / n_kv
  int window;  // 0: none
  float scale;
  int split;  // fewest keys per split
  void* out;  // [n][n_heads * hd]: f32, bf16 or (not by the tensor-core kernel alone) q8
  float* part_o;  // [n][n_splits][n_heads][hd]
  float* part_ml;  // [n][n_splits][n_heads][2]
  int n_splits;
  int out_kind;    // OUT_F32 or OUT_Q8: the o projection's input written directly, no quantize pass
  float2* out_ds;  // the q8 output's (scale, scale · sum) per 32
};

// Element e of the attention output (q8 needs the warp's 32 lanes on one group of 32).
__device__ __forceinline__ void attn_put(const AttnArgs& a, size_t e, float v) {
  put_out(a.out_kind, a.out, a.out_ds, e, v);
}

// The keys [lo, hi) that split s of token i attends to: empty for padding (position -1) and
// for splits past the end of the sequence.
__device__ __forceinline__ void attn_key_range(const AttnArgs& a, int i, int s, int* lo, int* hi) {
  int pos = a.tok_pos[i];
  *lo = *hi = 0;
  if (pos < 0) return;
  int start = a.window > 0 ? max(0, pos + 1 - a.window) : 0;
  int len = pos + 1 - start;
  int per = max(a.split, (len + a.n_splits - 1) / a.n_splits);
  per = (per + WARP - 1) / WARP * WARP;
  *lo = start + s * per;
  *hi = min(pos + 1, *lo + per);
}

// An empty key range's result for `heads` heads (`n` values): zero output, or a zero partial
// with (max -inf, sum 0) that attn_combine skips. Thread t of `threads`.
__device__ void attn_write_empty(const AttnArgs& a, size_t out_off, size_t part, int n, int heads, int t,
                                 int threads) {
  for (int e = t; e < n; e += threads) {
    if (a.n_splits == 1)
      attn_put(a, out_off + e, 0.f);
    else
      a.part_o[part * a.hd + e] = 0.f;
  }
  if (a.n_splits > 1 && t < heads) {
    a.part_ml[(part + t) * 2] = -INFINITY;
    a.part_ml[(part + t) * 2 + 1] = 0.f;
  }
}

template <int HD, int GMAX>
__device__ void attn_decode_impl(const AttnArgs& a) {
  // V: each lane holds DPL dims of one key row; LPK lanes cover a row, KPW rows at a time.
  constexpr int DPL = HD >= 256 ? HD / 32 : 4, LPK = HD / DPL, KPW = WARP / LPK;
  constexpr int KCH = HD < 128 ? HD : 128;  // key dims loaded at once in the score phase
  constexpr int NP = GMAX == 1 ? 4 : 1;     // partial sums per score (one head: break the chain)
  typedef typename std::conditional<DPL == 8, uint4, uint2>::type VT;
  PDL_ENTRY();
  extern __shared__ float smem[];
  int bi = blockIdx.x, s = blockIdx.z;
  int H = a.heads, q0 = blockIdx.y * H, g = q0 / (a.n_heads / a.n_kv);
  int i = a.tok_list ? a.tok_list[bi] : bi;
  int tid = threadIdx.x, lane = tid % WARP, w = tid / WARP;
  int lo, hi;
  attn_key_range(a, i, s, &lo, &hi);
  size_t out_off = (size_t)i * a.n_heads * HD + (size_t)q0 * HD;
  size_t part = ((size_t)bi * a.n_splits + s) * a.n_heads + q0;
  if (hi <= lo) {
    attn_write_empty(a, out_off, part, H * HD, H, tid, ATT_THREADS);
    return;
  }
  float* qs = smem;                          // [H][HD] scaled queries
  float* ps = qs + H * HD;                   // [ATT_WARPS][H][32] probabilities of a tile
  float* ow = ps + ATT_WARPS * H * WARP;     // [ATT_WARPS][H][HD] warp outputs
  float* mlw = ow + ATT_WARPS * H * HD;      // [ATT_WARPS][H][2] warp max and sum
  const float* qrow = a.q + (size_t)i * a.q_ld + (size_t)q0 * HD;
  for (int e = tid; e < H * HD; e += ATT_THREADS) qs[e] = qrow[e] * a.scale;
  __syncthreads();
  const int* table = a.tables + (size_t)a.tok_seq[i] * a.max_blocks;
  size_t k_off = (size_t)g * a.block_size * HD;
  // A key's V row is this far after its K row (same block and slot).
  size_t v_delta = (size_t)a.block_size * a.n_kv * HD;
  float m[GMAX], l[GMAX], o[GMAX][DPL];
#pragma unroll
  for (int h = 0; h < GMAX; h++) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int d = 0; d < DPL; d++) o[h][d] = 0.f;
  }
  float* pw = ps + w * H * WARP;
  for (int t0 = lo + w * WARP; t0 < hi; t0 += ATT_WARPS * WARP) {
    // Scores of key t0 + lane.
    int p = t0 + lane;
    bool valid = p < hi;
    const bf16* k = a.kv_layer + k_off;
    if (valid) k += (size_t)table[p / a.block_size] * a.block_stride + (size_t)(p % a.block_size) * HD;
    float sc[GMAX][NP];
#pragma unroll
    for (int h = 0; h < GMAX; h++)
#pragma unroll
      for (int c = 0; c < NP; c++) sc[h][c] = 0.f;
    if (valid) {
#pragma unroll
      for (int d0 = 0; d0 < HD; d0 += KCH) {
        uint4 kq[KCH / 8];
#pragma unroll
        for (int u = 0; u < KCH / 8; u++) kq[u] = *reinterpret_cast<const uint4*>(k + d0 + 8 * u);
#pragma unroll
        for (int u = 0; u < KCH / 8; u++) {
          float kf[8];
          bf16x8_to_f32(kq[u], kf);
#pragma unroll
          for (int h = 0; h < GMAX; h++) {
            if (h < H) {
              const float4* qh = reinterpret_cast<const float4*>(qs + h * HD + d0 + 8 * u);
              float4 qa = qh[0], qb = qh[1];
              float& acc = sc[h][u % NP];
              acc = fmaf(qa.x, kf[0], acc);
              acc = fmaf(qa.y, kf[1], acc);
              acc = fmaf(qa.z, kf[2], acc);
              acc = fmaf(qa.w, kf[3], acc);
              acc = fmaf(qb.x, kf[4], acc);
              acc = fmaf(qb.y, kf[5], acc);
              acc = fmaf(qb.z, kf[6], acc);
              acc = fmaf(qb.w, kf[7], acc);
            }
          }
        }
      }
    }
    // Online softmax: the tile's max per head rescales what came before.
#pragma unroll
    for (int h = 0; h < GMAX; h++) {
      if (h < H) {
        float sv = sc[h][0];
#pragma unroll
        for (int c = 1; c < NP; c++) sv += sc[h][c];
        float mt = warp_max(valid ? sv : -INFINITY);
        float mn = fmaxf(m[h], mt);
        float corr = __expf(m[h] - mn);
        float pr = valid ? __expf(sv - mn) : 0.f;
        m[h] = mn;
        l[h] = l[h] * corr + pr;  // per lane; summed over the warp at the end
#pragma unroll
        for (int d = 0; d < DPL; d++) o[h][d] *= corr;
        pw[h * WARP + lane] = pr;
      }
    }
    __syncwarp();
    // P·V: lane takes dims (lane % LPK)·DPL.. of rows lane / LPK, + KPW, ...; a row's address
    // comes from the lane that scored its key.
    int dl = (lane % LPK) * DPL, kr = lane / LPK;
    VT vq[WARP / KPW];
#pragma unroll
    for (int u = 0; u < WARP / KPW; u++) {
      int kt = u * KPW + kr;
      const bf16* v = reinterpret_cast<const bf16*>(__shfl_sync(0xffffffffu, reinterpret_cast<uintptr_t>(k), kt));
      if (t0 + kt < hi) vq[u] = *reinterpret_cast<const VT*>(v + v_delta + dl);
    }
#pragma unroll
    for (int u = 0; u < WARP / KPW; u++) {
      int kt = u * KPW + kr;
      if (t0 + kt >= hi) break;
      float vf[DPL];
      const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&vq[u]);
#pragma unroll
      for (int d = 0; d < DPL / 2; d++) {
        float2 f2 = __bfloat1622float2(h2[d]);
        vf[2 * d] = f2.x;
        vf[2 * d + 1] = f2.y;
      }
#pragma unroll
      for (int h = 0; h < GMAX; h++) {
        if (h < H) {
          float pr = pw[h * WARP + kt];
#pragma unroll
          for (int d = 0; d < DPL; d++) o[h][d] = fmaf(pr, vf[d], o[h][d]);
        }
      }
    }
    __syncwarp();
  }
  // The warp's sums over its lanes (rows of different keys hold the same dims), to shared memory.
#pragma unroll
  for (int h = 0; h < GMAX; h++) {
    if (h < H) {
      float lw = warp_sum(l[h]);
#pragma unroll
      for (int d = 0; d < DPL; d++)
#pragma unroll
        for (int off = LPK; off < WARP; off *= 2) o[h][d] += __shfl_xor_sync(0xffffffffu, o[h][d], off);
      if (lane < LPK)
#pragma unroll
        for (int d = 0; d < DPL; d++) ow[(w * H + h) * HD + lane * DPL + d] = o[h][d];
      if (lane == 0) {
        mlw[(w * H + h) * 2] = m[h];
        mlw[(w * H + h) * 2 + 1] = lw;
      }
    }
  }
  __syncthreads();
  // Merge the warps.
  for (int e = tid; e < H * HD; e += ATT_THREADS) {
    int h = e / HD;
    float mx = -INFINITY;
#pragma unroll
    for (int q = 0; q < ATT_WARPS; q++) mx = fmaxf(mx, mlw[(q * H + h) * 2]);
    float ov = 0.f, lv = 0.f;
#pragma unroll
    for (int q = 0; q < ATT_WARPS; q++) {
      float f = mlw[(q * H + h) * 2 + 1] > 0.f ? __expf(mlw[(q * H + h) * 2] - mx) : 0.f;
      ov += f * ow[(q * H + h) * HD + e % HD];
      lv += f * mlw[(q * H + h) * 2 + 1];
    }
    if (a.n_splits == 1) {
      attn_put(a, out_off + e, ov / lv);
    } else {
      a.part_o[part * HD + e] = ov;
      if (e % HD == 0) {
        a.part_ml[(part + h) * 2] = mx;
        a.part_ml[(part + h) * 2 + 1] = lv;
      }
    }
  }
}

#define ATTN_DECODE(HD, GMAX) \
  extern "C" __global__ void __launch_bounds__(ATT_THREADS) attn_decode_##HD##_##GMAX(AttnArgs a) { attn_decode_impl<HD, GMAX>(a); }
#define ATTN_DECODE_HD(HD) ATTN_DECODE(HD, 1) ATTN_DECODE(HD, 8) ATTN_DECODE(HD, 16)
ATTN_DECODE_HD(16)
ATTN_DECODE_HD(32)
ATTN_DECODE_HD(64)
ATTN_DECODE_HD(128)
ATTN_DECODE_HD(256)

// Merges the splits of attn_decode: grid (block row, query head), hd threads. Empty splits
// carry (max -inf, sum 0) and zero outputs.
extern "C" __global__ void attn_combine(AttnArgs a) {
  PDL_ENTRY();
  int bi = blockIdx.x, h = blockIdx.y, hd = a.hd;
  int i = a.tok_list ? a.tok_list[bi] : bi;
  const float* ml = a.part_ml + ((size_t)bi * a.n_splits * a.n_heads + h) * 2;
  const float* po = a.part_o + ((size_t)bi * a.n_splits * a.n_heads + h) * hd;
  size_t ss = (size_t)a.n_heads;  // stride between splits, in (max, sum) pairs / head rows
  float m = -INFINITY;
#pragma unroll 8
  for (int s = 0; s < a.n_splits; s++) m = fmaxf(m, ml[s * ss * 2]);
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float o = 0.f, l = 0.f;
#pragma unroll 8
    for (int s = 0; s < a.n_splits; s++) {
      float ls = ml[s * ss * 2 + 1];
      float f = ls > 0.f ? __expf(ml[s * ss * 2] - m) : 0.f;
      o += f * po[s * ss * hd + d];
      l += f * ls;
    }
    attn_put(a, (size_t)i * a.n_heads * hd + h * hd + d, l > 0.f ? o / l : 0.f);
  }
}

// ------------------------------------------------------------------------------------------
// Prefill attention, FlashAttention-2 style on the tensor cores: a block takes a tile of up
// to 64 consecutive query tokens of one sequence and one query head (4 warps × 16 rows); key
// and value tiles of 64 positions are gathered from the paged cache into shared memory, scores
// come from mma.sync (bf16 in, f32 accumulate), the softmax is online (running max and sum
// per row), and P·V is a second mma with P taken straight from the score registers.

#define FA_BK 64

struct FlashArgs {
  const float* q;
  int q_ld;
  const bf16* kv_layer;
  size_t block_stride;
  const int* tables;
  int max_blocks;
  const int* tiles;  // [n_tiles][4]: first token, tokens (<= 64), sequence, position of the first
  int n_heads, n_kv, block_size, window;
  float scale;
  void* out;     // [tokens][n_heads * hd]
  int out_kind;  // OUT_F32 or OUT_BF16 (the GEMM input)
};

__device__ __forceinline__ uint32_t pack_bf16_raw(bf16 lo, bf16 hi) {
  return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// c (16×8 f32) += a (16×16 bf16, row) · b (16×8 bf16, col).
__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int HD>
__device__ void attn_prefill_impl(const FlashArgs& a) {
  constexpr int LD = HD + 8;  // padded rows: the 4 lanes of a quad hit different banks
  __shared__ __align__(16) bf16 ks[FA_BK * LD];
  __shared__ __align__(16) bf16 vs[FA_BK * LD];
  PDL_ENTRY();
  const int* t = a.tiles + blockIdx.x * 4;
  int tok0 = t[0], ntok = t[1], seq = t[2], pos0 = t[3];
  int h = blockIdx.y, kvh = h / (a.n_heads / a.n_kv);
  int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, gid = lane / 4, tq = lane % 4;
  // This thread's two query rows (C-fragment rows gid and gid + 8 of its warp's 16).
  int ra = warp * 16 + gid, rb = ra + 8;
  int qa = pos0 + ra, qb = pos0 + rb;
  bool va = ra < ntok, vb = rb < ntok;
  uint32_t qf[HD / 16][4];
  {
    const float* xa = a.q + (size_t)(tok0 + min(ra, ntok - 1)) * a.q_ld + h * HD;
    const float* xb = a.q + (size_t)(tok0 + min(rb, ntok - 1)) * a.q_ld + h * HD;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
      int c = kk * 16 + 2 * tq;
      qf[kk][0] = pack_bf16(xa[c] * a.scale, xa[c + 1] * a.scale);
      qf[kk][1] = pack_bf16(xb[c] * a.scale, xb[c + 1] * a.scale);
      qf[kk][2] = pack_bf16(xa[c + 8] * a.scale, xa[c + 9] * a.scale);
      qf[kk][3] = pack_bf16(xb[c + 8] * a.scale, xb[c + 9] * a.scale);
    }
  }
  float o[HD / 8][4];
#pragma unroll
  for (int d = 0; d < HD / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
  int last = pos0 + ntok - 1;
  int first = a.window > 0 ? max(0, pos0 + 1 - a.window) : 0;
  const int* table = a.tables + (size_t)seq * a.max_blocks;
  size_t head_off = (size_t)kvh * a.block_size * HD, v_off = (size_t)a.block_size * a.n_kv * HD;
  for (int k0 = first / FA_BK * FA_BK; k0 <= last; k0 += FA_BK) {
    __syncthreads();  // the previous tile's shared-memory reads are done
    for (int e = threadIdx.x; e < FA_BK * (HD / 8); e += blockDim.x) {
      int kk = e / (HD / 8), ch = e % (HD / 8), p = k0 + kk;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (p <= last) {
        const bf16* base = a.kv_layer + (size_t)table[p / a.block_size] * a.block_stride + head_off +
                           (size_t)(p % a.block_size) * HD + ch * 8;
        kv = *reinterpret_cast<const uint4*>(base);
        vv = *reinterpret_cast<const uint4*>(base + v_off);
      }
      *reinterpret_cast<uint4*>(&ks[kk * LD + ch * 8]) = kv;
      *reinterpret_cast<uint4*>(&vs[kk * LD + ch * 8]) = vv;
    }
    __syncthreads();
    float sc[FA_BK / 8][4];
#pragma unroll
    for (int j = 0; j < FA_BK / 8; j++) {
      sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
      const bf16* kr = &ks[(j * 8 + gid) * LD + 2 * tq];
#pragma unroll
      for (int kk = 0; kk < HD / 16; kk++) {
        uint32_t b0 = *reinterpret_cast<const uint32_t*>(kr + kk * 16);
        uint32_t b1 = *reinterpret_cast<const uint32_t*>(kr + kk * 16 + 8);
        mma_bf16(sc[j], qf[kk], b0, b1);
      }
    }
    // Causal (and sliding-window) mask, then the rows' new maxima.
    float mxa = -INFINITY, mxb = -INFINITY;
#pragma unroll
    for (int j = 0; j < FA_BK / 8; j++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        int kp = k0 + j * 8 + 2 * tq + e;
        bool oka = va && kp <= qa && (a.window <= 0 || kp > qa - a.window);
        bool okb = vb && kp <= qb && (a.window <= 0 || kp > qb - a.window);
        if (!oka) sc[j][e] = -INFINITY;
        if (!okb) sc[j][2 + e] = -INFINITY;
        mxa = fmaxf(mxa, sc[j][e]);
        mxb = fmaxf(mxb, sc[j][2 + e]);
      }
    mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 1));
    mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 2));
    mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 1));
    mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 2));
    float na = fmaxf(m_a, mxa), nb = fmaxf(m_b, mxb);
    // A row with nothing unmasked yet keeps 0 as its reference (no -inf minus -inf).
    float ref_a = na == -INFINITY ? 0.f : na, ref_b = nb == -INFINITY ? 0.f : nb;
    float ca = __expf(m_a - ref_a), cb = __expf(m_b - ref_b);
    m_a = na;
    m_b = nb;
    l_a *= ca;
    l_b *= cb;
#pragma unroll
    for (int d = 0; d < HD / 8; d++) {
      o[d][0] *= ca;
      o[d][1] *= ca;
      o[d][2] *= cb;
      o[d][3] *= cb;
    }
#pragma unroll
    for (int j = 0; j < FA_BK / 8; j++) {
      sc[j][0] = __expf(sc[j][0] - ref_a);
      sc[j][1] = __expf(sc[j][1] - ref_a);
      sc[j][2] = __expf(sc[j][2] - ref_b);
      sc[j][3] = __expf(sc[j][3] - ref_b);
      l_a += sc[j][0] + sc[j][1];
      l_b += sc[j][2] + sc[j][3];
    }
    // O += P · V over the tile's 64 keys, 16 at a time.
#pragma unroll
    for (int kk = 0; kk < FA_BK / 16; kk++) {
      uint32_t pa[4] = {pack_bf16(sc[2 * kk][0], sc[2 * kk][1]), pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                        pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                        pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
      const bf16* v0 = &vs[(kk * 16 + 2 * tq) * LD + gid];
#pragma unroll
      for (int d = 0; d < HD / 8; d++) {
        const bf16* vd = v0 + d * 8;
        uint32_t b0 = pack_bf16_raw(vd[0], vd[LD]);
        uint32_t b1 = pack_bf16_raw(vd[8 * LD], vd[9 * LD]);
        mma_bf16(o[d], pa, b0, b1);
      }
    }
  }
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
  int qd = a.n_heads * HD;
#pragma unroll
  for (int d = 0; d < HD / 8; d++) {
    int c = h * HD + d * 8 + 2 * tq;
    if (va) {
      size_t e = (size_t)(tok0 + ra) * qd + c;
      put_plain(a.out_kind, a.out, e, o[d][0] / l_a);
      put_plain(a.out_kind, a.out, e + 1, o[d][1] / l_a);
    }
    if (vb) {
      size_t e = (size_t)(tok0 + rb) * qd + c;
      put_plain(a.out_kind, a.out, e, o[d][2] / l_b);
      put_plain(a.out_kind, a.out, e + 1, o[d][3] / l_b);
    }
  }
}

extern "C" __global__ void __launch_bounds__(128) attn_prefill_64(FlashArgs a) { attn_prefill_impl<64>(a); }
extern "C" __global__ void __launch_bounds__(128) attn_prefill_128(FlashArgs a) { attn_prefill_impl<128>(a); }

// ------------------------------------------------------------------------------------------
// Decode attention of a KV head's whole query group on the tensor cores, for large decode
// batches: one warp per (query token, KV head, split). The group's query heads are the rows
// of the mma's A operand (16 rows; rows past the group are zeros and are not written), and
// keys come in tiles of BK positions that cp.async copies into shared memory with the whole
// tile in flight at once (the CUDA-core kernel above waits on each warp's loads in turn). A
// warp waits for its tile before computing on it, so overlap comes from other warps: 32-key
// tiles (17 KB of shared memory) let 13 warps share an SM where 64-key tiles let 6 (H100,
// serving 128 sequences: decode step 7.94 -> 7.56 ms). Q
// and the probabilities enter the bf16 mma as a high and a low bf16 part, so scores and
// outputs keep f32 accuracy like the CUDA-core kernel (the tensor cores have time to spare);
// K and V are bf16 in the cache. Keys per split, outputs and split partials as attn_decode.

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}

// (x, y) as the bf16 pair hi = rn(x, y) and the pair lo = rn(x - hi, y - hi).
__device__ __forceinline__ void split_bf16(float x, float y, uint32_t* hi, uint32_t* lo) {
  __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  float2 hf = __bfloat1622float2(h);
  __nv_bfloat162 l = __floats2bfloat162_rn(x - hf.x, y - hf.y);
  *hi = *reinterpret_cast<uint32_t*>(&h);
  *lo = *reinterpret_cast<uint32_t*>(&l);
}

template <int HD, int BK>
__device__ void attn_decode_mma_impl(const AttnArgs& a) {
  constexpr int LD = HD + 8;
  __shared__ __align__(16) bf16 ks[BK * LD];
  __shared__ __align__(16) bf16 vs[BK * LD];
  PDL_ENTRY();
  int bi = blockIdx.x, g = blockIdx.y, s = blockIdx.z;
  int G = a.n_heads / a.n_kv, q0 = g * G;
  int i = a.tok_list ? a.tok_list[bi] : bi;
  int lane = threadIdx.x, gid = lane / 4, tq = lane % 4;
  int lo, hi;
  attn_key_range(a, i, s, &lo, &hi);
  size_t out_off = (size_t)i * a.n_heads * HD + (size_t)q0 * HD;
  size_t part = ((size_t)bi * a.n_splits + s) * a.n_heads + q0;
  if (hi <= lo) {
    attn_write_empty(a, out_off, part, G * HD, G, lane, WARP);
    return;
  }
  // This lane's rows of the A operand: heads q0 + gid and q0 + gid + 8.
  bool va = gid < G, vb = gid + 8 < G;
  uint32_t qh[HD / 16][4], ql[HD / 16][4];
  {
    const float* xa = a.q + (size_t)i * a.q_ld + (size_t)(q0 + (va ? gid : 0)) * HD;
    const float* xb = a.q + (size_t)i * a.q_ld + (size_t)(q0 + (vb ? gid + 8 : 0)) * HD;
    float sa = va ? a.scale : 0.f, sb = vb ? a.scale : 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
      int c = kk * 16 + 2 * tq;
      split_bf16(xa[c] * sa, xa[c + 1] * sa, &qh[kk][0], &ql[kk][0]);
      split_bf16(xb[c] * sb, xb[c + 1] * sb, &qh[kk][1], &ql[kk][1]);
      split_bf16(xa[c + 8] * sa, xa[c + 9] * sa, &qh[kk][2], &ql[kk][2]);
      split_bf16(xb[c + 8] * sb, xb[c + 9] * sb, &qh[kk][3], &ql[kk][3]);
    }
  }
  float o[HD / 8][4];
#pragma unroll
  for (int d = 0; d < HD / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;
  const int* table = a.tables + (size_t)a.tok_seq[i] * a.max_blocks;
  size_t head_off = (size_t)g * a.block_size * HD, v_off = (size_t)a.block_size * a.n_kv * HD;
  for (int k0 = lo; k0 < hi; k0 += BK) {
    __syncwarp();  // the previous tile's shared-memory reads are done
    for (int e = lane; e < BK * (HD / 8); e += WARP) {
      int kk = e / (HD / 8), ch = e % (HD / 8), p = k0 + kk;
      bf16* kd = &ks[kk * LD + ch * 8];
      bf16* vd = &vs[kk * LD + ch * 8];
      if (p < hi) {
        const bf16* base = a.kv_layer + (size_t)table[p / a.block_size] * a.block_stride + head_off +
                           (size_t)(p % a.block_size) * HD + ch * 8;
        cp_async16(kd, base);
        cp_async16(vd, base + v_off);
      } else {
        // Zeros past the end: their probabilities are 0, and 0 · garbage could be NaN.
        *reinterpret_cast<uint4*>(kd) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(vd) = make_uint4(0, 0, 0, 0);
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    __syncwarp();
    float sc[BK / 8][4];
#pragma unroll
    for (int j = 0; j < BK / 8; j++) {
      sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
      const bf16* kr = &ks[(j * 8 + gid) * LD + 2 * tq];
#pragma unroll
      for (int kk = 0; kk < HD / 16; kk++) {
        uint32_t b0 = *reinterpret_cast<const uint32_t*>(kr + kk * 16);
        uint32_t b1 = *reinterpret_cast<const uint32_t*>(kr + kk * 16 + 8);
        mma_bf16(sc[j], qh[kk], b0, b1);
        mma_bf16(sc[j], ql[kk], b0, b1);
      }
    }
    // Keys past the split's end are masked; then the rows' new maxima (the tile's first key
    // is always valid, so no row stays at -inf).
    float mxa = -INFINITY, mxb = -INFINITY;
#pragma unroll
    for (int j = 0; j < BK / 8; j++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        if (k0 + j * 8 + 2 * tq + e >= hi) sc[j][e] = sc[j][2 + e] = -INFINITY;
        mxa = fmaxf(mxa, sc[j][e]);
        mxb = fmaxf(mxb, sc[j][2 + e]);
      }
    mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 1));
    mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 2));
    mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 1));
    mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 2));
    float na = fmaxf(m_a, mxa), nb = fmaxf(m_b, mxb);
    float ca = __expf(m_a - na), cb = __expf(m_b - nb);
    m_a = na;
    m_b = nb;
    l_a *= ca;
    l_b *= cb;
#pragma unroll
    for (int d = 0; d < HD / 8; d++) {
      o[d][0] *= ca;
      o[d][1] *= ca;
      o[d][2] *= cb;
      o[d][3] *= cb;
    }
#pragma unroll
    for (int j = 0; j < BK / 8; j++) {
      sc[j][0] = __expf(sc[j][0] - na);
      sc[j][1] = __expf(sc[j][1] - na);
      sc[j][2] = __expf(sc[j][2] - nb);
      sc[j][3] = __expf(sc[j][3] - nb);
      l_a += sc[j][0] + sc[j][1];
      l_b += sc[j][2] + sc[j][3];
    }
    // O += P · V over the tile's keys, 16 at a time.
#pragma unroll
    for (int kk = 0; kk < BK / 16; kk++) {
      uint32_t ph[4], pl[4];
      split_bf16(sc[2 * kk][0], sc[2 * kk][1], &ph[0], &pl[0]);
      split_bf16(sc[2 * kk][2], sc[2 * kk][3], &ph[1], &pl[1]);
      split_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1], &ph[2], &pl[2]);
      split_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3], &ph[3], &pl[3]);
      const bf16* v0 = &vs[(kk * 16 + 2 * tq) * LD + gid];
#pragma unroll
      for (int d = 0; d < HD / 8; d++) {
        const bf16* vd = v0 + d * 8;
        uint32_t b0 = pack_bf16_raw(vd[0], vd[LD]);
        uint32_t b1 = pack_bf16_raw(vd[8 * LD], vd[9 * LD]);
        mma_bf16(o[d], ph, b0, b1);
        mma_bf16(o[d], pl, b0, b1);
      }
    }
  }
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
  l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
  l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
  bool whole = a.n_splits == 1;
#pragma unroll
  for (int d = 0; d < HD / 8; d++) {
    int c = d * 8 + 2 * tq;
    // Whole results go out per element: f32 or bf16 (q8 needs whole groups in a warp).
    if (va && whole) {
      put_plain(a.out_kind, a.out, out_off + (size_t)gid * HD + c, o[d][0] / l_a);
      put_plain(a.out_kind, a.out, out_off + (size_t)gid * HD + c + 1, o[d][1] / l_a);
    } else if (va) {
      a.part_o[(part + gid) * HD + c] = o[d][0];
      a.part_o[(part + gid) * HD + c + 1] = o[d][1];
    }
    if (vb && whole) {
      put_plain(a.out_kind, a.out, out_off + (size_t)(gid + 8) * HD + c, o[d][2] / l_b);
      put_plain(a.out_kind, a.out, out_off + (size_t)(gid + 8) * HD + c + 1, o[d][3] / l_b);
    } else if (vb) {
      a.part_o[(part + gid + 8) * HD + c] = o[d][2];
      a.part_o[(part + gid + 8) * HD + c + 1] = o[d][3];
    }
  }
  if (!whole && tq == 0) {
    if (va) {
      a.part_ml[(part + gid) * 2] = m_a;
      a.part_ml[(part + gid) * 2 + 1] = l_a;
    }
    if (vb) {
      a.part_ml[(part + gid + 8) * 2] = m_b;
      a.part_ml[(part + gid + 8) * 2 + 1] = l_b;
    }
  }
}

extern "C" __global__ void __launch_bounds__(WARP) attn_decode_mma_64(AttnArgs a) { attn_decode_mma_impl<64, 32>(a); }
extern "C" __global__ void __launch_bounds__(WARP) attn_decode_mma_128(AttnArgs a) { attn_decode_mma_impl<128, 32>(a); }

// ------------------------------------------------------------------------------------------
// Greedy sampling: out[i] = argmax of logits row i (the first index on ties, as the CPU sampler).

extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int vocab, int* __restrict__ out) {
  PDL_ENTRY();
  __shared__ float bv[32];
  __shared__ int bi[32];
  const float* row = logits + (size_t)blockIdx.x * vocab;
  float best = -INFINITY;
  int idx = 0x7fffffff;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    float v = row[j];
    if (v > best) {  // strided scan: later j of this thread only wins when larger
      best = v;
      idx = j;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    float v2 = __shfl_xor_sync(0xffffffffu, best, o);
    int i2 = __shfl_xor_sync(0xffffffffu, idx, o);
    if (v2 > best || (v2 == best && i2 < idx)) {
      best = v2;
      idx = i2;
    }
  }
  int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
  if (lane == 0) {
    bv[w] = best;
    bi[w] = idx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int k = 1; k < (int)(blockDim.x / WARP); k++)
      if (bv[k] > best || (bv[k] == best && bi[k] < idx)) {
        best = bv[k];
        idx = bi[k];
      }
    out[blockIdx.x] = idx == 0x7fffffff ? 0 : idx;
  }
}

// ------------------------------------------------------------------------------------------
// Random weights generated on the device (dummy models of real shapes, no host transfer).

__device__ __forceinline__ uint32_t hash32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return (uint32_t)x;
}

// Uniform in [-a, a) with a = std * sqrt(3): the same variance as N(0, std^2).
extern "C" __global__ void fill_random_bf16(bf16* p, size_t n, uint64_t seed, float std) {
  PDL_ENTRY();
  float a = std * 1.7320508f;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
    float u = hash32(seed * 0x9E3779B97F4A7C15ULL + e) * (1.0f / 4294967296.0f);
    p[e] = __float2bfloat16((2.f * u - 1.f) * a);
  }
}

extern "C" __global__ void fill_random_bytes(uint8_t* p, size_t n, uint64_t seed) {
  PDL_ENTRY();
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x)
    p[e] = (uint8_t)hash32(seed * 0x9E3779B97F4A7C15ULL + e);
}

// Sets one f16 field at byte `at` of every `block_bytes`-sized block (scales of random blocks).
extern "C" __global__ void set_block_f16(uint8_t* p, size_t n_blocks, int block_bytes, int at, float value) {
  PDL_ENTRY();
  __half v = __float2half(value);
  for (size_t b = blockIdx.x * (size_t)blockDim.x + threadIdx.x; b < n_blocks; b += (size_t)gridDim.x * blockDim.x)
    *reinterpret_cast<__half*>(p + b * block_bytes + at) = v;
}

extern "C" __global__ void fill_f16(__half* p, size_t n, float value) {
  PDL_ENTRY();
  __half v = __float2half(value);
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) p[e] = v;
}

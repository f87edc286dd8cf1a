// Whittle CUDA kernels, compiled at run time with NVRTC (no nvcc at build time). No headers are included so the
// source compiles with NVRTC alone; f16 is widened with a PTX cvt instead of cuda_fp16.h.
//
// gemv_int4 runs the CPU packed layout unchanged (see kernels/src/packed.rs): per row, words of 16 lanes × u32,
// lane j of word w holding at bits 4p..4p+4 the code of padded column 16·(8w + p) + j. One warp per row; each
// thread loads one 128-bit quarter of a word (4 lanes), so a warp reads 8 consecutive words = 512 contiguous bytes
// per step: fully coalesced. The scale is applied per group inside the word, or at the word's end for a group that
// continues into the next word (scaling is linear, so partial sums may be scaled separately). The zero point is
// folded out with Σx per group: y = Σ s·Σq·x − Σ_k s_k·z_k·Σx_k.

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void gemv_int4(
    const unsigned int* __restrict__ words,      // rows × nw × 16
    const float* __restrict__ scales,            // rows × ng, stream-group order
    const float* __restrict__ zeros,             // rows × ng
    const unsigned int* __restrict__ word_group, // nw: stream group open at the start of word w
    const unsigned int* __restrict__ flush,      // nw: bit p = slice p of word w ends a group
    const float* __restrict__ xp,                // tokens × nw·128 padded, permuted activations
    const float* __restrict__ sx,                // tokens × ng: Σx per stream group
    float* __restrict__ y,                       // tokens × rows
    int rows, int nw, int ng)
{
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    // Token blockIdx.y of a small batch (grid.y = tokens); the weight rows are re-read per token from L2.
    xp += (size_t)blockIdx.y * nw * 128;
    sx += (size_t)blockIdx.y * ng;
    y += (size_t)blockIdx.y * rows;
    const uint4* wrow = reinterpret_cast<const uint4*>(words + (size_t)row * nw * 16);
    const float* srow = scales + (size_t)row * ng;
    const float* zrow = zeros + (size_t)row * ng;
    const int quarter = lane & 3;
    float total = 0.f;
    for (int w = lane >> 2; w < nw; w += 8) {
        const uint4 v = __ldg(wrow + w * 4 + quarter);
        const unsigned int f = __ldg(flush + w);
        int k = __ldg(word_group + w);
        const float* xw = xp + w * 128 + quarter * 4;
        float acc = 0.f;
        #pragma unroll
        for (int p = 0; p < 8; ++p) {
            const float4 xv = __ldg(reinterpret_cast<const float4*>(xw + p * 16));
            acc += (float)((v.x >> (4 * p)) & 15u) * xv.x + (float)((v.y >> (4 * p)) & 15u) * xv.y
                 + (float)((v.z >> (4 * p)) & 15u) * xv.z + (float)((v.w >> (4 * p)) & 15u) * xv.w;
            if ((f >> p) & 1u) {
                total += __ldg(srow + k) * acc;
                acc = 0.f;
                ++k;
            }
        }
        if (k < ng) total += __ldg(srow + k) * acc;
    }
    for (int k = lane; k < ng; k += 32) total -= __ldg(srow + k) * __ldg(zrow + k) * __ldg(sx + k);
    total = warp_sum(total);
    if (lane == 0) y[row] = total;
}

__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Dense f16 GEMV, the reference the int4 speedup is measured against: one warp per row, 8 halves (16 bytes) per
// thread per step.
extern "C" __global__ void gemv_f16(
    const unsigned short* __restrict__ w, const float* __restrict__ x, float* __restrict__ y, int rows, int cols)
{
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    x += (size_t)blockIdx.y * cols; // token blockIdx.y of a small batch
    y += (size_t)blockIdx.y * rows;
    const unsigned short* wr = w + (size_t)row * cols;
    float acc = 0.f;
    const int vec_cols = ((cols & 7) == 0) ? cols : 0; // 16-byte loads need 16-byte aligned rows
    for (int c = lane * 8; c < vec_cols; c += 256) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(wr + c));
        const unsigned int u[4] = {v.x, v.y, v.z, v.w};
        #pragma unroll
        for (int j = 0; j < 4; ++j) {
            acc += h2f((unsigned short)(u[j] & 0xffffu)) * __ldg(x + c + 2 * j)
                 + h2f((unsigned short)(u[j] >> 16)) * __ldg(x + c + 2 * j + 1);
        }
    }
    for (int c = vec_cols + lane; c < cols; c += 32) acc += h2f(__ldg(wr + c)) * __ldg(x + c);
    acc = warp_sum(acc);
    if (lane == 0) y[row] = acc;
}

// 2:4 sparse with 4-bit values, the CPU layout unchanged (see kernels/src/sparse24.rs): rows in pairs; per 256-column
// block a record of 48 u32: 16 position lanes, then 2 × 16 code lanes. Lane j of window `win` holds, for column group
// L = j/4 of the window, row j/2 % 2 of the pair, slot j % 2: its 2-bit position at bit pos_shift(win) of position
// lane j, its code at nibble win % 8 of code lane 16·(win / 8) + j. One warp per row pair, half a warp per block:
// thread (b, j) decodes lane j of all 16 windows of block b. Activations are zero-padded to blocks·256.
__device__ __forceinline__ unsigned int pos_shift(int win) {
    return 8u * ((win % 8) / 2) + 2u * (2u * (win / 8) + win % 2);
}

extern "C" __global__ void gemv_sparse24_q4(
    const unsigned int* __restrict__ data,       // row pairs × blocks × 48
    const float* __restrict__ scales,            // padded rows × groups
    const float* __restrict__ zeros,             // padded rows × groups
    const unsigned int* __restrict__ win_group,  // blocks·16: group of each 16-column window
    const float* __restrict__ x,                 // tokens × blocks·256
    float* __restrict__ y,                       // tokens × rows
    int rows, int blocks, int groups)
{
    const int pair = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (2 * pair >= rows) return;
    x += (size_t)blockIdx.y * blocks * 256;
    y += (size_t)blockIdx.y * rows;
    const int j = lane & 15;
    const int rr = (j >> 1) & 1;
    const int L = j >> 2;
    const int r = 2 * pair + rr;
    const float* srow = scales + (size_t)r * groups;
    const float* zrow = zeros + (size_t)r * groups;
    float acc = 0.f;
    for (int b = lane >> 4; b < blocks; b += 2) {
        const unsigned int* rec = data + ((size_t)pair * blocks + b) * 48;
        const unsigned int pos = __ldg(rec + j);
        const unsigned int code[2] = {__ldg(rec + 16 + j), __ldg(rec + 32 + j)};
        const float* xb = x + b * 256 + 4 * L;
        #pragma unroll
        for (int win = 0; win < 16; ++win) {
            const unsigned int p = (pos >> pos_shift(win)) & 3u;
            const unsigned int q = (code[win >> 3] >> (4 * (win & 7))) & 15u;
            const int g = __ldg(win_group + b * 16 + win);
            acc += __ldg(srow + g) * ((float)q - __ldg(zrow + g)) * __ldg(xb + win * 16 + p);
        }
    }
    // Lanes of row 0 of the pair are those with (j >> 1) & 1 == 0; sum each row over the warp separately.
    float a0 = rr == 0 ? acc : 0.f, a1 = rr == 1 ? acc : 0.f;
    a0 = warp_sum(a0);
    a1 = warp_sum(a1);
    if (lane == 0) {
        y[2 * pair] = a0;
        if (2 * pair + 1 < rows) y[2 * pair + 1] = a1;
    }
}

// Device-memory read bandwidth, the reference `whittle bench gemv --device cuda` divides by: every thread sums a
// grid-stride run of float4s; one atomic per warp keeps the loads from being optimized away.
extern "C" __global__ void stream_read(const float4* __restrict__ a, unsigned long long n4, float* __restrict__ out)
{
    float s = 0.f;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n4;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const float4 v = __ldg(a + i);
        s += (v.x + v.y) + (v.z + v.w);
    }
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) atomicAdd(out, s);
}

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
    const float* __restrict__ xp,                // nw·128 padded, permuted activations
    const float* __restrict__ sx,                // ng: Σx per stream group
    float* __restrict__ y,
    int rows, int nw, int ng)
{
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
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

// Banded ("diagonaled") matrix products for sliding-window attention, compiled at run
// time by impls/cupy_banded.py through CuPy's RawModule (NVRTC). No headers are
// included, so the source compiles wherever NVRTC runs.
//
// The math. Per (batch, head) slice, with n tokens, head dimension D, band width
// W = w + 1, column offset `off` (w/2, or w when causal) and the head's dilation d,
// column c of query row i of a band stands for the key
//
//     key(i, c) = i + d * (c - off),          0 <= c < W,
//
// which exists when 0 <= key(i, c) < n (windows are truncated at the edges). Three
// products move between the dense (n, D) tensors and the (n, W) band:
//
//   (1) band_qk   S[i, c]   = alpha * sum_k A[i, k] * X[key(i, c), k]
//                 e.g. the scores scale * Q K^T restricted to the band, or, in the
//                 backward pass, dP = dO V^T restricted to the band.
//   (2) band_av   Out[i, k] = alpha * sum_c P[i, c] * X[key(i, c), k]
//                 e.g. O = P V, or dQ = scale * dS K.
//   (3) band_tv   Out[j, k] = alpha * sum_c P[row(j, c), c] * X[row(j, c), k],
//                 row(j, c) = j - d * (c - off)   (the query whose column c is key j)
//                 the transposed band: dK = scale * dS^T Q and dV = P^T dO.
//
// Residue classes. key(i, c) - i is a multiple of d, so a query and all of its keys
// lie in the same residue class {r, r + d, r + 2d, ...}, r = i mod d. Writing
// i = r + d * t (t = the "class index"), the key of column c has class index
// u = t + (c - off): inside one class the dilated band is an ordinary undilated band.
// Every kernel therefore works on a tile of consecutive class indices of one class,
// which makes the keys a tile needs one contiguous run of class indices, loaded once
// into shared memory and reused along the diagonals. Class r holds
// len = ceil((n - r) / d) tokens; class index t is valid when 0 <= t < len.
//
// Layout: A, X, Out are (B*H, n, D) row-major; a band is (B*H, n, ld) float32, its
// first W columns being the band (ld >= W leaves room for extra columns after the
// band, e.g. global-key scores joined into the same softmax). Element types: float,
// half_t (IEEE fp16) or bf16_t (bfloat16) inputs; every product accumulates in
// float32. Out-of-range band entries: (1) writes `fill` there (-inf before a softmax,
// 0 for a gradient); (2) and (3) read them as zero, so garbage cannot leak in.
//
// Launch: blockDim (16, 16); gridDim.x enumerates (class, tile) pairs: for a head of
// dilation d, tiles_per_class = ceil(ceil(n / d) / 64) and block x serves class
// x / tiles_per_class, tile x % tiles_per_class (blocks past the head's last class
// exit at once, so one grid serves heads of different dilations); gridDim.z = B * H.
// band_qk: gridDim.y = ceil(W / 64) column tiles. band_av / band_tv: gridDim.y =
// ceil(D / 64) tiles of the head dimension.

// ------------------------------------------------------------------ element types

struct half_t {
    unsigned short bits;  // IEEE 754 binary16
};
struct bf16_t {
    unsigned short bits;  // bfloat16: the upper 16 bits of a float32
};

#ifdef BANDED_HOST_EMULATION
// A host build of this file (an offline check that runs the kernels on the CPU)
// supplies these two.
float half_bits_to_float(unsigned short bits);
unsigned short float_to_half_bits(float v);
#else
__device__ __forceinline__ float half_bits_to_float(unsigned short bits) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
}
__device__ __forceinline__ unsigned short float_to_half_bits(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));  // round to nearest even
    return h;
}
#endif

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(half_t v) { return half_bits_to_float(v.bits); }
__device__ __forceinline__ float to_float(bf16_t v) { return __uint_as_float(((unsigned)v.bits) << 16); }

template <typename O>
__device__ __forceinline__ O from_float(float v);

template <>
__device__ __forceinline__ float from_float<float>(float v) {
    return v;
}
template <>
__device__ __forceinline__ half_t from_float<half_t>(float v) {
    half_t h;
    h.bits = float_to_half_bits(v);
    return h;
}
template <>
__device__ __forceinline__ bf16_t from_float<bf16_t>(float v) {
    // Round to nearest even on the bit pattern: add 0x7fff plus the lowest kept bit,
    // then truncate. NaN is kept a (quiet) NaN instead of rounding into infinity.
    unsigned u = __float_as_uint(v);
    bf16_t b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = 0x7fc0;
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        b.bits = (unsigned short)(u >> 16);
    }
    return b;
}

// ------------------------------------------------------------------ tiling

#define TILE 64     // class indices per block (rows of the output tile)
#define QK_COLS 64  // band columns per band_qk block
#define QK_K 32     // head-dimension slice staged in shared memory by band_qk
#define MV_C 32     // band columns staged per step by band_av / band_tv
#define MV_D 64     // head-dimension columns per band_av / band_tv block

// What one block works on: the TILE class indices t0 .. t0+63 of class r (len tokens)
// of one (batch, head) slice whose head has dilation d.
struct Tile {
    long long base;  // the slice's first row in the (B*H*n, ...) tensors
    int d, r, t0, len;

    // The row of class index t in the (B*H*n, ...) tensors: token r + d*t of the slice.
    __device__ __forceinline__ long long row(int t) const { return base + (r + d * t); }
    __device__ __forceinline__ bool has(int t) const { return t >= 0 && t < len; }
};

// Which tile this block serves. Returns false when the block has nothing to do; that
// holds for the whole block, so the early return happens before any __syncthreads.
__device__ __forceinline__ bool tile_of_block(int n, int H, const int* __restrict__ dil, Tile& tile) {
    const int bh = blockIdx.z;
    const int d = dil[bh % H];
    const int m = (n + d - 1) / d;                 // length of the longest class (class 0)
    const int tiles_per_class = (m + TILE - 1) / TILE;
    tile.base = (long long)bh * n;
    tile.d = d;
    tile.r = blockIdx.x / tiles_per_class;
    if (tile.r >= d) return false;                 // past this head's classes
    tile.t0 = (blockIdx.x % tiles_per_class) * TILE;
    tile.len = (n - tile.r + d - 1) / d;           // ceil((n - r) / d); 0 when r >= n
    return tile.t0 < tile.len;
}

// Stages class indices first .. first+ROWS-1 (one per row of S) x head dims
// k0 .. k0+COLS-1 of the (B*H*n, D) tensor x into S as float, zeros past the class or
// past D. The 256 threads stride over the tile: a warp reads consecutive dims of a row.
template <int COLS, int ROWS, int LD, typename T>
__device__ __forceinline__ void stage_rows(float (&S)[ROWS][LD], const T* __restrict__ x, const Tile& tile, int first,
                                           int k0, int D, int tid) {
    for (int e = tid; e < ROWS * COLS; e += 256) {
        const int row = e / COLS, kk = e % COLS, u = first + row, k = k0 + kk;
        S[row][kk] = (tile.has(u) && k < D) ? to_float(x[tile.row(u) * D + k]) : 0.f;
    }
}

// The frame of band_av and band_tv. A block computes 64 consecutive class indices of
// its tile (output rows) x 64 head dims kd0 .. kd0+63, looping over the band in steps
// of 32 columns c0 .. c0+31. A step stages its band entries (stage_band(c0, tid) does,
// and returns the class index of the first of the 95 consecutive rows of x they meet)
// and those rows of x. Thread (p, q) owns the 4 consecutive output rows 4q + i and the
// dims p + 16j and walks the staged rows 4q + s (s < 35); band(tl, sl) is the staged
// band entry that output row tl meets at staged row sl (0 where there is none). Each
// loaded row of x (4 values) serves 4 output rows: 8 loads per 16 multiply-adds, and
// only 3 of 35 steps are partly idle. Xs rows are padded to 68 floats so the two row
// groups q, q + 1 of a warp read disjoint banks.
template <typename T, typename O, typename StageBand, typename BandEntry>
__device__ __forceinline__ void band_mv(const T* __restrict__ x, O* __restrict__ out, const Tile& tile, int D, int W,
                                        float alpha, StageBand stage_band, BandEntry band) {
    __shared__ float Xs[TILE + MV_C - 1][MV_D + 4];
    const int kd0 = blockIdx.y * MV_D;
    const int p = threadIdx.x, q = threadIdx.y, tid = q * 16 + p;

    float acc[4][4] = {};
    for (int c0 = 0; c0 < W; c0 += MV_C) {
        const int first = stage_band(c0, tid);
        stage_rows<MV_D>(Xs, x, tile, first, kd0, D, tid);
        __syncthreads();
#pragma unroll 5
        for (int s = 0; s < MV_C + 3; ++s) {
            float xv[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) xv[j] = Xs[4 * q + s][p + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float bv = band(4 * q + i, 4 * q + s);
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += bv * xv[j];
            }
        }
        __syncthreads();  // before the next step overwrites the staged rows
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int t = tile.t0 + 4 * q + i;
        if (t >= tile.len) continue;
        O* __restrict__ orow = out + tile.row(t) * D;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int k = kd0 + p + 16 * j;
            if (k < D) orow[k] = from_float<O>(alpha * acc[i][j]);
        }
    }
}

// ------------------------------------------------------------------ (1) band_qk
//
//   S[i, c] = alpha * sum_k A[i, k] * X[i + d*(c - off), k]     (fill where no key)
//
// One block: 64 consecutive class indices t0 .. t0+63 (rows) x 64 columns c0 .. c0+63.
// Row t, column c needs key class index u = t + c - off, so the whole tile needs the
// 64 + 64 - 1 = 127 consecutive keys u0 .. u0+126 with u0 = t0 + c0 - off, and entry
// (row tl, column cl) of the tile reads staged key tl + cl: a diagonal.
// Thread (p, q) owns rows q + 16a and columns p + 16b (a, b < 4); its 16 entries read
// only the 7 staged keys p + q + 16e (e = a + b < 7), so per k it loads 4 query values
// and 7 key values for 16 multiply-adds. Shared rows are padded to 33 floats: the
// keys p + q + 16e of one warp (p + q spans 17 values) then fall in distinct banks.
// When key_skip is non-null, keys with key_skip[key] != 0 are filled too (global keys
// that live in their own columns outside the band).
template <typename T>
__global__ void __launch_bounds__(256)
    band_qk(const T* __restrict__ a, const T* __restrict__ x, float* __restrict__ s, const int* __restrict__ dil,
            const unsigned char* __restrict__ key_skip, int H, int n, int D, int W, int off, int ld, float alpha,
            float fill) {
    __shared__ float As[TILE][QK_K + 1];
    __shared__ float Xs[TILE + QK_COLS - 1][QK_K + 1];
    Tile tile;
    if (!tile_of_block(n, H, dil, tile)) return;
    const int c0 = blockIdx.y * QK_COLS;
    const int u0 = tile.t0 + c0 - off;  // class index of the key staged in Xs row 0
    const int p = threadIdx.x, q = threadIdx.y, tid = q * 16 + p;

    float acc[4][4] = {};
    for (int k0 = 0; k0 < D; k0 += QK_K) {
        // Stage A rows t0.. and keys u0.. for head dims k0 .. k0+31.
        stage_rows<QK_K>(As, a, tile, tile.t0, k0, D, tid);
        stage_rows<QK_K>(Xs, x, tile, u0, k0, D, tid);
        __syncthreads();
#pragma unroll 4
        for (int kk = 0; kk < QK_K; ++kk) {
            float av[4], xv[7];
#pragma unroll
            for (int i = 0; i < 4; ++i) av[i] = As[q + 16 * i][kk];
#pragma unroll
            for (int e = 0; e < 7; ++e) xv[e] = Xs[p + q + 16 * e][kk];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * xv[i + j];
        }
        __syncthreads();  // before the next slice overwrites the staged rows
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int t = tile.t0 + q + 16 * i;
        if (t >= tile.len) continue;
        float* __restrict__ srow = s + tile.row(t) * ld;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = c0 + p + 16 * j;
            if (c >= W) continue;
            const int u = t + c - off;  // key class index; key position r + d*u
            const bool ok = tile.has(u) && !(key_skip != nullptr && key_skip[tile.r + tile.d * u]);
            srow[c] = ok ? alpha * acc[i][j] : fill;
        }
    }
}

// ------------------------------------------------------------------ (2) band_av
//
//   Out[i, k] = alpha * sum_c P[i, c] * X[i + d*(c - off), k]
//
// In the frame of band_mv: a step of columns c0 .. c0+31 needs the 95 consecutive keys
// u0 .. u0+94 (u0 = t0 + c0 - off); row tl, column cl meets staged key tl + cl.
template <typename T, typename O>
__global__ void __launch_bounds__(256)
    band_av(const float* __restrict__ pb, const T* __restrict__ x, O* __restrict__ out, const int* __restrict__ dil,
            int H, int n, int D, int W, int off, int ld, float alpha) {
    __shared__ float Ps[TILE][MV_C + 1];
    Tile tile;
    if (!tile_of_block(n, H, dil, tile)) return;
    const auto stage_band = [&](int c0, int tid) {
        // Band tile: rows t0.., columns c0..; zero where the row, the column or the
        // key does not exist.
        for (int e = tid; e < TILE * MV_C; e += 256) {
            const int row = e / MV_C, cl = e % MV_C, t = tile.t0 + row, c = c0 + cl;
            const bool ok = t < tile.len && c < W && tile.has(t + c - off);
            Ps[row][cl] = ok ? pb[tile.row(t) * ld + c] : 0.f;
        }
        return tile.t0 + c0 - off;  // u0
    };
    const auto band = [&](int tl, int sl) {
        const int cl = sl - tl;  // row tl meets staged key sl in column sl - tl
        const bool in = cl >= 0 && cl < MV_C;
        return in ? Ps[tl][in ? cl : 0] : 0.f;
    };
    band_mv(x, out, tile, D, W, alpha, stage_band, band);
}

// ------------------------------------------------------------------ (3) band_tv
//
//   Out[j, k] = alpha * sum_c P[j - d*(c - off), c] * X[j - d*(c - off), k]
//
// The transpose of (2): row j of the output gathers, from each column c, the query
// whose column c is key j. In class indices key u meets query t = u - (c - off).
// In the frame of band_mv, with the tile's class indices u0 .. u0+63 as the keys: a
// step of columns c0 .. c0+31 needs the 95 consecutive queries t_lo .. t_lo+94 with
// t_lo = u0 - c0 - 31 + off; key ul, column cl meets staged query ul - cl + 31. The
// band is staged as that 95 x 32 rectangle (row by row, so global reads stay
// coalesced), i.e. indexed by the same staged row as X.
template <typename T, typename O>
__global__ void __launch_bounds__(256)
    band_tv(const float* __restrict__ pb, const T* __restrict__ x, O* __restrict__ out, const int* __restrict__ dil,
            int H, int n, int D, int W, int off, int ld, float alpha) {
    __shared__ float Bs[TILE + MV_C - 1][MV_C + 1];
    Tile tile;
    if (!tile_of_block(n, H, dil, tile)) return;
    const auto stage_band = [&](int c0, int tid) {
        const int t_lo = tile.t0 - c0 - (MV_C - 1) + off;  // query class index staged in row 0
        // The band rectangle rows t_lo .. t_lo+94, columns c0 .. c0+31. An entry whose
        // key falls outside this block's keys is staged but never read; one whose key
        // is past the class end only feeds an output row that is not written.
        for (int e = tid; e < (TILE + MV_C - 1) * MV_C; e += 256) {
            const int row = e / MV_C, cl = e % MV_C, t = t_lo + row, c = c0 + cl;
            const bool ok = tile.has(t) && c < W && t + c - off >= 0;
            Bs[row][cl] = ok ? pb[tile.row(t) * ld + c] : 0.f;
        }
        return t_lo;
    };
    const auto band = [&](int ul, int sl) {
        const int cl = MV_C - 1 + ul - sl;  // key ul meets staged query sl in column 31 + ul - sl
        const bool in = cl >= 0 && cl < MV_C;
        return in ? Bs[sl][in ? cl : 0] : 0.f;
    };
    band_mv(x, out, tile, D, W, alpha, stage_band, band);
}

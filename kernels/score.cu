// Fused all-pairs scoring kernel for cvig-engine, launched through CuPy
// (cvig_engine.scoring.cuda_kernel).
//
// For every (query q, tile a) pair of a launch it computes, without writing any correlation to
// global memory:
//   P_f   = sum_k conj(G[q, k, f]) * A[a, v, k, f]          for every frequency f (complex, fp32)
//   corr  = inverse real DFT of P (constant-memory basis)   for every orientation o
//   s*    = first argmax over s = v * W + o (strict '>', v major, as orientation_distance)
//   d     = 2 - 2 * corr[s*] * inv_root[a, s*]              (inv_root = 1 / sqrt(max(E, 1e-12)))
// and then updates, per query:
//   - the rank count: pairs with d <= d_true (pessimistic) or d < d_true (optimistic), leaving
//     out the true tile and the "near" pairs with |d - d_true| <= band, which are appended to a
//     list for the host to recompute in float64;
//   - a top-L list per (query, split of the tiles) in (distance, index) order, with each entry's
//     shift, merged on the host;
//   - optionally the distance matrix row.
//
// One thread block scores TQ queries x TA tiles at a time (one pair per thread) and walks the
// tiles of its split. The spectra of a chunk of CVIG_KC contraction rows are staged in shared
// memory for all frequencies; each thread accumulates its pair's spectrum in registers
// (re[F], im[F]), then evaluates the W correlations and keeps the running first maximum.
//
// Compile-time shape (NVRTC -D options; the defaults are the VGG16 360-degree shapes, used by
// .ci/compile_kernels.sh):
//   CVIG_W  aerial width W (orientation bins)
//   CVIG_K  contraction length C * H of the ground map
//   CVIG_V  vertical offsets V = Ha - H + 1
//   CVIG_L  top-L list length per query and split
#ifndef CVIG_W
#define CVIG_W 64
#endif
#ifndef CVIG_K
#define CVIG_K 64
#endif
#ifndef CVIG_V
#define CVIG_V 1
#endif
#ifndef CVIG_L
#define CVIG_L 15
#endif

#define CVIG_F (CVIG_W / 2 + 1)
#define CVIG_S (CVIG_V * CVIG_W)
#define CVIG_TQ 16
#define CVIG_TA 16
#define CVIG_THREADS (CVIG_TQ * CVIG_TA)
// Contraction rows staged per step: the staging arrays hold CVIG_KC * F * 17 float2 per side.
#ifndef CVIG_KC
#define CVIG_KC ((CVIG_W <= 64) ? 4 : ((CVIG_W <= 128) ? 2 : 1))
#endif

// Inverse real DFT: corr[o] = sum_f re[f] * basis[2f][o] + im[f] * basis[2f + 1][o], with
// basis[2f][o] = w_f cos(2 pi f o / W) / W and basis[2f + 1][o] = -w_f sin(2 pi f o / W) / W,
// w_f = 1 for f = 0 and f = W / 2, else 2. Filled by the host before the first launch.
__constant__ float c_basis[2 * CVIG_F * CVIG_W];

__device__ __forceinline__ bool cvig_before(float distance, int index, float other_distance,
                                            int other_index)
{
    return distance < other_distance || (distance == other_distance && index < other_index);
}

extern "C" __global__ void __launch_bounds__(CVIG_THREADS)
cvig_score(const float2* __restrict__ query_spectra,   // [num_queries][K][F]
           const float2* __restrict__ tile_spectra,    // [num_tiles][V][K][F]
           const float* __restrict__ inv_root,         // [num_tiles][S]
           const float* __restrict__ true_distance,    // [num_queries], NaN where unknown
           const int* __restrict__ match,              // [num_queries], -1 where unknown
           int num_queries, int num_tiles, int tiles_per_split, int num_splits,
           int pessimistic, float band,
           unsigned int* __restrict__ counts,          // [num_queries], added to
           int* __restrict__ near_count,               // [1], added to
           int* __restrict__ near_pairs,               // [near_capacity][2] (query, tile)
           int near_capacity,
           float* __restrict__ candidate_distance,     // [num_queries][num_splits][L]
           int* __restrict__ candidate_index,          // [num_queries][num_splits][L]
           int* __restrict__ candidate_shift,          // [num_queries][num_splits][L]
           int write_matrix,
           float* __restrict__ matrix)                 // [num_queries][num_tiles] when write_matrix
{
    __shared__ float2 s_query[CVIG_KC][CVIG_F][CVIG_TQ + 1];
    __shared__ float2 s_tile[CVIG_KC][CVIG_F][CVIG_TA + 1];
    __shared__ float s_distance[CVIG_TQ][CVIG_TA];
    __shared__ int s_shift[CVIG_TQ][CVIG_TA];
    __shared__ float s_top_distance[CVIG_TQ][CVIG_L];
    __shared__ int s_top_index[CVIG_TQ][CVIG_L];
    __shared__ int s_top_shift[CVIG_TQ][CVIG_L];
    __shared__ unsigned int s_count[CVIG_TQ];

    const float infinity = __int_as_float(0x7f800000);
    const int thread = threadIdx.x;
    const int local_query = thread / CVIG_TA;
    const int local_tile = thread % CVIG_TA;
    const int first_query = blockIdx.x * CVIG_TQ;
    const int split = blockIdx.y;
    const int tile_begin = split * tiles_per_split;
    const int tile_end = min(num_tiles, tile_begin + tiles_per_split);
    const int query = first_query + local_query;
    const bool query_valid = query < num_queries;
    const float query_true = query_valid ? true_distance[query] : __int_as_float(0x7fc00000);
    const int query_match = query_valid ? match[query] : -1;

    for (int i = thread; i < CVIG_TQ * CVIG_L; i += CVIG_THREADS) {
        s_top_distance[i / CVIG_L][i % CVIG_L] = infinity;
        s_top_index[i / CVIG_L][i % CVIG_L] = 0x7fffffff;
        s_top_shift[i / CVIG_L][i % CVIG_L] = -1;
    }
    if (thread < CVIG_TQ) {
        s_count[thread] = 0u;
    }

    for (int first_tile = tile_begin; first_tile < tile_end; first_tile += CVIG_TA) {
        const int tile = first_tile + local_tile;
        const bool tile_valid = tile < tile_end;
        float best = -infinity;
        int best_shift = 0;
        for (int v = 0; v < CVIG_V; ++v) {
            float re[CVIG_F];
            float im[CVIG_F];
#pragma unroll
            for (int f = 0; f < CVIG_F; ++f) {
                re[f] = 0.0f;
                im[f] = 0.0f;
            }
            for (int k0 = 0; k0 < CVIG_K; k0 += CVIG_KC) {
                __syncthreads();  // the previous step's readers are done with the staging arrays
                for (int i = thread; i < CVIG_TQ * CVIG_KC * CVIG_F; i += CVIG_THREADS) {
                    const int f = i % CVIG_F;
                    const int kk = (i / CVIG_F) % CVIG_KC;
                    const int qq = i / (CVIG_F * CVIG_KC);
                    const int k = k0 + kk;
                    float2 value = make_float2(0.0f, 0.0f);
                    if (first_query + qq < num_queries && k < CVIG_K) {
                        const size_t row = (size_t)(first_query + qq) * CVIG_K + k;
                        value = query_spectra[row * CVIG_F + f];
                    }
                    s_query[kk][f][qq] = value;
                }
                for (int i = thread; i < CVIG_TA * CVIG_KC * CVIG_F; i += CVIG_THREADS) {
                    const int f = i % CVIG_F;
                    const int kk = (i / CVIG_F) % CVIG_KC;
                    const int aa = i / (CVIG_F * CVIG_KC);
                    const int k = k0 + kk;
                    float2 value = make_float2(0.0f, 0.0f);
                    if (first_tile + aa < tile_end && k < CVIG_K) {
                        const size_t row = ((size_t)(first_tile + aa) * CVIG_V + v) * CVIG_K + k;
                        value = tile_spectra[row * CVIG_F + f];
                    }
                    s_tile[kk][f][aa] = value;
                }
                __syncthreads();
#pragma unroll
                for (int kk = 0; kk < CVIG_KC; ++kk) {
#pragma unroll
                    for (int f = 0; f < CVIG_F; ++f) {
                        const float2 g = s_query[kk][f][local_query];
                        const float2 x = s_tile[kk][f][local_tile];
                        // conj(g) * x = (g.x x.x + g.y x.y) + i (g.x x.y - g.y x.x)
                        re[f] = fmaf(g.x, x.x, fmaf(g.y, x.y, re[f]));
                        im[f] = fmaf(g.x, x.y, fmaf(-g.y, x.x, im[f]));
                    }
                }
            }
#pragma unroll
            for (int o = 0; o < CVIG_W; ++o) {
                float correlation = 0.0f;
#pragma unroll
                for (int f = 0; f < CVIG_F; ++f) {
                    correlation = fmaf(re[f], c_basis[(2 * f) * CVIG_W + o], correlation);
                    correlation = fmaf(im[f], c_basis[(2 * f + 1) * CVIG_W + o], correlation);
                }
                if (correlation > best) {  // strict: the first maximum wins
                    best = correlation;
                    best_shift = v * CVIG_W + o;
                }
            }
        }

        float distance = infinity;
        if (query_valid && tile_valid) {
            distance = 2.0f - 2.0f * (best * inv_root[(size_t)tile * CVIG_S + best_shift]);
            if (query_match >= 0 && tile != query_match) {
                if (band > 0.0f && fabsf(distance - query_true) <= band) {
                    const int slot = atomicAdd(near_count, 1);
                    if (slot < near_capacity) {
                        near_pairs[2 * slot] = query;
                        near_pairs[2 * slot + 1] = tile;
                    }
                } else if (pessimistic ? distance <= query_true : distance < query_true) {
                    atomicAdd(&s_count[local_query], 1u);
                }
            }
            if (write_matrix) {
                matrix[(size_t)query * num_tiles + tile] = distance;
            }
        }
        s_distance[local_query][local_tile] = distance;
        s_shift[local_query][local_tile] = best_shift;
        __syncthreads();
        if (thread < CVIG_TQ && first_query + thread < num_queries) {
            // One thread per query merges this step's TA candidates, in increasing tile order.
            for (int j = 0; j < CVIG_TA && first_tile + j < tile_end; ++j) {
                const float candidate = s_distance[thread][j];
                const int index = first_tile + j;
                if (!cvig_before(candidate, index, s_top_distance[thread][CVIG_L - 1],
                                 s_top_index[thread][CVIG_L - 1])) {
                    continue;
                }
                int position = CVIG_L - 1;
                while (position > 0 &&
                       cvig_before(candidate, index, s_top_distance[thread][position - 1],
                                   s_top_index[thread][position - 1])) {
                    s_top_distance[thread][position] = s_top_distance[thread][position - 1];
                    s_top_index[thread][position] = s_top_index[thread][position - 1];
                    s_top_shift[thread][position] = s_top_shift[thread][position - 1];
                    --position;
                }
                s_top_distance[thread][position] = candidate;
                s_top_index[thread][position] = index;
                s_top_shift[thread][position] = s_shift[thread][j];
            }
        }
        // The next step's first __syncthreads() keeps s_distance until this merge is done.
    }
    __syncthreads();
    if (thread < CVIG_TQ && first_query + thread < num_queries) {
        const int row = first_query + thread;
        if (s_count[thread] > 0u) {
            atomicAdd(&counts[row], s_count[thread]);
        }
        const size_t base = ((size_t)row * num_splits + split) * CVIG_L;
        for (int i = 0; i < CVIG_L; ++i) {
            candidate_distance[base + i] = s_top_distance[thread][i];
            candidate_index[base + i] = s_top_index[thread][i];
            candidate_shift[base + i] = s_top_shift[thread][i];
        }
    }
}

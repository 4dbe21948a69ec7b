"""The CUDA kernel's source, run on the CPU: kernels/score.cu compiled as C++20 with a shim.

Machines without a GPU cannot launch the kernel, but its logic (staging, spectra, inverse DFT,
first argmax, distance, rank counts, near list, top-L lists) can still be checked: the shim maps
``__shared__`` to one static array per kernel, ``threadIdx`` to a thread-local value,
``__syncthreads()`` to a std::barrier over 256 std::threads and ``atomicAdd`` to std::atomic_ref,
and runs the grid one thread block at a time. The outputs are compared with the float64 brute
force. Needs g++ with C++20 (skips otherwise); the GPU itself is tested in test_scoring_cuda.py.
"""
import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from cvig_engine.scoring.cuda_kernel import (QUERIES_PER_BLOCK, THREADS, inverse_dft_basis,
                                             kernel_options, kernel_source, merge_candidates,
                                             query_spectra, split_plan, tile_spectra)
from cvig_engine.scoring.geometry import Geometry, inverse_root_energy, window_energy_float64
from references import ranks_reference, topk_reference, vertical_distance_reference
from test_scoring import make_problem, reference_for, shift_near_ties, vertical_problem

SHIM = r"""
#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstring>
#include <math.h>
#include <thread>
#include <vector>
struct float2 { float x, y; };
static inline float2 make_float2(float x, float y) { return {x, y}; }
struct Index3 { int x = 0, y = 0, z = 0; };
thread_local Index3 threadIdx;
static Index3 blockIdx;
static std::barrier<>* emulated_barrier = nullptr;
static inline void __syncthreads() { emulated_barrier->arrive_and_wait(); }
static inline float __int_as_float(int bits) { return std::bit_cast<float>(bits); }
static inline unsigned int atomicAdd(unsigned int* address, unsigned int value)
{ return std::atomic_ref<unsigned int>(*address).fetch_add(value); }
static inline int atomicAdd(int* address, int value)
{ return std::atomic_ref<int>(*address).fetch_add(value); }
using std::min;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __constant__
#define __shared__ static
"""

DRIVER = r"""
#include "kernel.cu"
extern "C" void set_basis(const float* basis) { std::memcpy(c_basis, basis, sizeof(c_basis)); }
extern "C" void run_grid(int grid_x, int grid_y, const float2* query_spectra,
                         const float2* tile_spectra, const float* inv_root,
                         const float* true_distance, const int* match,
                         int num_queries, int num_tiles, int tiles_per_split, int num_splits,
                         int pessimistic, float band, unsigned int* counts, int* near_count,
                         int* near_pairs, int near_capacity, float* candidate_distance,
                         int* candidate_index, int* candidate_shift, int write_matrix,
                         float* matrix)
{
    for (int y = 0; y < grid_y; ++y) {
        for (int x = 0; x < grid_x; ++x) {
            blockIdx.x = x;
            blockIdx.y = y;
            std::barrier<> barrier(CVIG_THREADS);
            emulated_barrier = &barrier;
            std::vector<std::thread> threads;
            for (int t = 0; t < CVIG_THREADS; ++t) {
                threads.emplace_back([=]() {
                    threadIdx.x = t;
                    cvig_score(query_spectra, tile_spectra, inv_root, true_distance, match,
                               num_queries, num_tiles, tiles_per_split, num_splits,
                               pessimistic, band, counts, near_count, near_pairs, near_capacity,
                               candidate_distance, candidate_index, candidate_shift, write_matrix,
                               matrix);
                });
            }
            for (auto& thread : threads) thread.join();
        }
    }
}
"""


def _compiler():
    compiler = shutil.which("g++")
    if compiler is None:
        return None
    probe = subprocess.run([compiler, "-std=c++20", "-x", "c++", "-fsyntax-only", "-"],
                           input="#include <barrier>\n#include <bit>\nint main(){}", text=True,
                           capture_output=True)
    return compiler if probe.returncode == 0 else None


pytestmark = pytest.mark.skipif(_compiler() is None,
                                reason="needs g++ with C++20 <barrier> and <bit>")


_LIBRARIES = {}


class EmulatedKernel:
    """kernels/score.cu built for the CPU, called like FusedScorer calls the GPU kernel."""

    def __init__(self, directory, geometry, candidates):
        options = kernel_options(geometry, candidates)
        if options not in _LIBRARIES:
            _LIBRARIES[options] = self._build(directory, options)
        self.library = _LIBRARIES[options]
        basis = np.ascontiguousarray(inverse_dft_basis(geometry.aerial_width))
        self.library.set_basis(basis.ctypes.data_as(ctypes.c_void_p))
        self.geometry = geometry
        self.candidates = candidates

    @staticmethod
    def _build(directory, options):
        (directory / "shim.h").write_text(SHIM)
        (directory / "kernel.cu").write_text(kernel_source())
        (directory / "driver.cpp").write_text(DRIVER)
        library = directory / "kernel.so"
        command = [_compiler(), "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                   "-Wno-unknown-pragmas",
                   "-include", str(directory / "shim.h"), *options, str(directory / "driver.cpp"),
                   "-o", str(library)]
        subprocess.run(command, check=True, capture_output=True, text=True)
        library = ctypes.CDLL(str(library))
        integer, pointer = ctypes.c_int, ctypes.c_void_p
        library.run_grid.argtypes = ([integer] * 2 + [pointer] * 5 + [integer] * 5
                                     + [ctypes.c_float] + [pointer] * 3 + [integer]
                                     + [pointer] * 3 + [integer, pointer])
        return library

    def run(self, ground, aerial, energy, match, true_distance, *, pessimistic=True, band=0.0,
            near_capacity=4096, multiprocessors=1):
        count, num_tiles = len(ground), len(aerial)
        splits, per_split = split_plan(num_tiles, count, multiprocessors)
        arrays = {
            "query": np.ascontiguousarray(query_spectra(ground, self.geometry)),
            "tiles": np.ascontiguousarray(tile_spectra(aerial, self.geometry)),
            "inv_root": np.ascontiguousarray(inverse_root_energy(energy.reshape(num_tiles, -1))),
            "true": np.asarray(true_distance, dtype=np.float32),
            "match": np.asarray(match, dtype=np.int32),
            "counts": np.zeros(count, dtype=np.uint32),
            "near_count": np.zeros(1, dtype=np.int32),
            "near_pairs": np.full(2 * near_capacity, -7, dtype=np.int32),
            "candidate_distance": np.full((count, splits, self.candidates), -7.0, dtype=np.float32),
            "candidate_index": np.full((count, splits, self.candidates), -7, dtype=np.int32),
            "candidate_shift": np.full((count, splits, self.candidates), -7, dtype=np.int32),
            "matrix": np.full((count, num_tiles), -7.0, dtype=np.float32),  # poisoned: all written?
        }
        pointer = {name: array.ctypes.data_as(ctypes.c_void_p) for name, array in arrays.items()}
        self.library.run_grid(-(-count // QUERIES_PER_BLOCK), splits, pointer["query"],
                              pointer["tiles"],
                              pointer["inv_root"], pointer["true"], pointer["match"], count,
                              num_tiles,
                              per_split, splits, int(pessimistic), band, pointer["counts"],
                              pointer["near_count"], pointer["near_pairs"], near_capacity,
                              pointer["candidate_distance"], pointer["candidate_index"],
                              pointer["candidate_shift"], 1, pointer["matrix"])
        arrays["splits"] = splits
        return arrays


def _geometry(ground, aerial):
    return Geometry.from_shapes(ground.shape[1:], aerial.shape[1:])


@pytest.mark.parametrize("ground_width, multiprocessors, tie_rule", [
    (64, 1, "pessimistic"), (13, 3, "optimistic")])
def test_emulated_kernel_matches_brute_force(tmp_path, ground_width, multiprocessors, tie_rule):
    ground, aerial, match, _ = make_problem(ground_width, 41, 29, ground_width)
    match[[3, 17]] = -1
    geometry = _geometry(ground, aerial)
    assert geometry.aerial_width == 64 and THREADS == 256
    energy = window_energy_float64(aerial, 4, ground_width)
    distance, shift, correlation = reference_for((ground_width, 41, 29), ground, aerial)
    known = match >= 0
    true = np.where(known, distance[np.arange(41), np.maximum(match, 0)], np.nan)
    kernel = EmulatedKernel(tmp_path, geometry, candidates=7)
    out = kernel.run(ground, aerial, energy, match, true, pessimistic=tie_rule == "pessimistic",
                     multiprocessors=multiprocessors)
    if multiprocessors > 1:
        assert out["splits"] > 1  # the per-split lists are merged on the host
    near = shift_near_ties(correlation)
    np.testing.assert_allclose(out["matrix"][~near], distance[~near], atol=2e-6)
    assert out["near_count"][0] == 0  # band 0: no near list

    # Counts leave out the true tile: rank = counts + 1 (no near list with band 0).
    clean = ~near.any(axis=1)
    gaps = np.abs(distance - true[:, None])
    gaps[np.arange(41), np.maximum(match, 0)] = np.inf
    clean &= ~(gaps < 1e-5).any(axis=1)  # float32 cannot order distances this close to d_true
    expected_ranks = ranks_reference(distance, match, tie_rule)
    np.testing.assert_array_equal((out["counts"].astype(np.int64) + 1)[clean & known],
                                  expected_ranks[clean & known])
    assert np.all(out["counts"][~known] == 0)

    merged = merge_candidates(out["candidate_distance"].reshape(41, -1),
                              out["candidate_index"].reshape(41, -1),
                              out["candidate_shift"].reshape(41, -1), 29, 7)
    np.testing.assert_array_equal(merged["index"][clean], topk_reference(distance, 7)[clean])
    np.testing.assert_array_equal(merged["shift"][clean], np.take_along_axis(shift,
                                                                             merged["index"],
                                                                             1)[clean])
    np.testing.assert_allclose(merged["distance"], np.take_along_axis(distance, merged["index"],
                                                                      1), atol=2e-6)


def test_emulated_kernel_near_list_and_vertical_search(tmp_path):
    ground, aerial, match = vertical_problem(21, 21, 19, 4.0)
    geometry = _geometry(ground, aerial)
    energy = window_energy_float64(aerial, 2, 6)
    distance, flat_shift, correlation = vertical_distance_reference(ground, aerial)
    true = distance[np.arange(21), match]
    kernel = EmulatedKernel(tmp_path, geometry, candidates=4)
    out = kernel.run(ground, aerial, energy, match, true, band=0.05, multiprocessors=2)
    near = shift_near_ties(correlation)
    np.testing.assert_allclose(out["matrix"][~near], distance[~near], atol=2e-6)

    listed = out["near_count"][0]
    pairs = out["near_pairs"][:2 * listed].reshape(-1, 2)
    gap = np.abs(out["matrix"] - true[:, None].astype(np.float32))
    expected_near = {(n, m) for n in range(21) for m in range(19)
                     if m != match[n] and gap[n, m] <= np.float32(0.05)}
    assert {tuple(pair) for pair in pairs.tolist()} == expected_near and listed > 0
    counted = np.zeros(21, dtype=np.int64)
    for n in range(21):
        for m in range(19):
            if m != match[n] and (n, m) not in expected_near and distance[n, m] <= true[n]:
                counted[n] += 1
    np.testing.assert_array_equal(out["counts"], counted)
    merged = merge_candidates(out["candidate_distance"].reshape(21, -1),
                              out["candidate_index"].reshape(21, -1),
                              out["candidate_shift"].reshape(21, -1), 19, 4)
    clean = ~near.any(axis=1)
    np.testing.assert_array_equal(merged["index"][clean], topk_reference(distance, 4)[clean])
    np.testing.assert_array_equal(merged["shift"][clean], np.take_along_axis(flat_shift,
                                                                             merged["index"],
                                                                             1)[clean])


def test_emulated_kernel_reports_near_list_overflow(tmp_path):
    ground, aerial, match, _ = make_problem(3, 9, 12, 13)
    geometry = _geometry(ground, aerial)
    energy = window_energy_float64(aerial, 4, 13)
    distance, _, _ = reference_for(("emulation", 9, 12), ground, aerial)
    true = distance[np.arange(9), match]
    kernel = EmulatedKernel(tmp_path, geometry, candidates=3)
    out = kernel.run(ground, aerial, energy, match, true, band=10.0, near_capacity=5)
    # Every pair but the true ones is near; only the first 5 fit, the count says how many more.
    assert out["near_count"][0] == 9 * 11
    assert np.all(out["near_pairs"][10:] == -7) and np.all(out["near_pairs"][:10] >= 0)
    assert np.all(out["counts"] == 0)

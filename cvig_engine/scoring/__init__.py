"""All-pairs orientation-searched scoring of a feature store (CPU, CUDA kernel, torch CUDA).

    from cvig_engine.scoring import score_feature_store
    summary = score_feature_store("features.h5", "scores.h5", topk=10, ties="pessimistic")

Modules: ``engine`` (the driver, resume, ranks, top-K), ``tiles`` (float32 tile distances in
torch: spectral and direct), ``cuda_kernel`` (the fused CuPy kernel), ``exact`` (float64 pairs),
``geometry`` (shapes, spectral layout, cost model), ``output`` (SCORES.h5).
"""
from cvig_engine.scoring.engine import (ALGORITHMS, DEFAULT_TILES, DEVICES, TIE_RULES,
                                        estimate_memory_bytes, parse_tile, score_feature_store)

__all__ = ["score_feature_store", "parse_tile", "estimate_memory_bytes", "TIE_RULES", "DEVICES",
           "ALGORITHMS", "DEFAULT_TILES"]

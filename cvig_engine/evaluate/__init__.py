"""Evaluation: retrieval and heading metrics, trial statistics, reports and plots.

matplotlib loads only when plots are drawn, h5py only when a scores file is read.
"""
from cvig_engine.evaluate.metrics import (heading_metrics, ranks_from_distances, recall_at_k,
                                          retrieval_metrics)
from cvig_engine.evaluate.report import evaluate_scores, parse_groups
from cvig_engine.evaluate.scores_file import ScoredRun, load_scores
from cvig_engine.evaluate.statistics import mean_and_std, two_sample_t_test

__all__ = [
    "retrieval_metrics", "recall_at_k", "heading_metrics", "ranks_from_distances",
    "mean_and_std", "two_sample_t_test", "evaluate_scores", "parse_groups", "load_scores",
    "ScoredRun",
]

"""Tabulate the benchmark results: benchmarks/results/*.json -> benchmarks/RESULTS.md.

    python benchmarks/summarize.py [--results benchmarks/results] [--out benchmarks/RESULTS.md]

Keeps the newest result per machine and configuration (``cvig_engine.bench.results_markdown``);
files of another format are named at the end and otherwise left alone.
"""
import argparse
from pathlib import Path

from cvig_engine.bench import load_results, results_markdown
from cvig_engine.files import atomic_write_text

HERE = Path(__file__).resolve().parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    arguments = parser.parse_args()
    records, others = load_results(arguments.results)
    atomic_write_text(arguments.out, results_markdown(records, others))
    print(f"written {arguments.out} from {len(records)} result files")


if __name__ == "__main__":
    main()

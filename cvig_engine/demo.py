"""The main job on an embedded default: synthesise a held-out city, export the bundled tiny model,
embed with ONNX Runtime, score with orientation search, and write the evaluation report.

Each step is printed as the ``cvig-engine`` command that does the same thing, so that the demo
teaches the real workflow.
"""
from __future__ import annotations

import shlex
import time
from importlib import resources
from pathlib import Path

import click

from cvig_engine.errors import CvigInputError

BUNDLED_MODEL = "tiny_synth360.safetensors"
# The bundled model was trained on cities of another seed, so the demo's city is never seen in
# training.
DEMO_SEED = 2026


def bundled_checkpoint() -> Path:
    """Path of the tiny model that ships inside the package (see
    ``cvig_engine/assets/README.md``)."""
    path = Path(str(resources.files("cvig_engine") / "assets" / BUNDLED_MODEL))
    if not path.is_file():
        raise CvigInputError(f"the bundled model {path} is missing from this installation")
    return path


def _announce(step: int, total: int, command: list[str]) -> float:
    click.secho(f"[{step}/{total}] $ cvig-engine {shlex.join(command)}", fg="cyan", err=True)
    return time.perf_counter()


def run_demo(out_dir="cvig-demo", *, pairs: int = 400, seed: int = DEMO_SEED,
             tile_size: int = 256, pano_height: int = 128, pano_width: int = 512, checkpoint=None,
             progress: bool = True) -> dict:
    """Run the whole pipeline on a synthetic held-out city; return the evaluation report.

    Args:
        out_dir: where everything lands (the report as report.json, report.md and PNG plots).
        pairs: photo/tile pairs in the synthetic test city.
        seed: the synthetic world's seed.
        tile_size, pano_height, pano_width: synthetic image sizes (smaller is faster).
        checkpoint: a checkpoint to use instead of the bundled tiny model.
    """
    from cvig_engine.embed import embed_dataset
    from cvig_engine.evaluate import evaluate_scores
    from cvig_engine.evaluate.markdown import summary_text
    from cvig_engine.export import export_model
    from cvig_engine.scoring import score_feature_store
    from cvig_engine.synth import synthesize

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir, model_dir = out_dir / "data", out_dir / "model"
    features, scores = out_dir / "features.h5", out_dir / "scores.h5"
    checkpoint = Path(checkpoint) if checkpoint else bundled_checkpoint()
    timings = {}

    started = _announce(1, 5, ["synth", "-o", str(data_dir), "--pairs", str(pairs), "--cities", "1",
                               "--seed", str(seed), "--tile-size", str(tile_size),
                               "--pano-height", str(pano_height), "--pano-width", str(pano_width),
                               "--overwrite"])
    synthesize(data_dir, pairs=pairs, cities=1, test_cities=1, seed=seed, tile_size=tile_size,
               pano_height=pano_height, pano_width=pano_width, overwrite=True, progress=progress)
    timings["synth"] = time.perf_counter() - started

    started = _announce(2, 5, ["export", str(checkpoint), "-o", str(model_dir)])
    export_model(checkpoint, model_dir, progress=progress)
    timings["export"] = time.perf_counter() - started

    started = _announce(3, 5, ["embed", str(model_dir), "--data", str(data_dir / "test.csv"),
                               "-o", str(features), "--backend", "onnxruntime"])
    if features.exists():
        features.unlink()  # the city was just re-rendered: its old features no longer apply
    embed_dataset(model_dir, data_dir / "test.csv", features, backend="onnxruntime",
                  progress=progress)
    timings["embed"] = time.perf_counter() - started

    started = _announce(4, 5, ["score", "--features", str(features), "-o", str(scores),
                               "--overwrite"])
    score_feature_store(features, scores, overwrite=True, progress=progress)
    timings["score"] = time.perf_counter() - started

    started = _announce(5, 5, ["evaluate", str(scores), "-o", str(out_dir)])
    report = evaluate_scores([scores], out_dir)
    timings["evaluate"] = time.perf_counter() - started

    click.echo(summary_text(report))
    click.echo("stage seconds: "
               + ", ".join(f"{name} {seconds:.1f}" for name, seconds in timings.items()))
    click.echo(f"report: {out_dir / 'report.md'} (plots: recall_at_k.png, rank_cdf.png)")
    report["demo_timings_seconds"] = timings
    return report

"""`cvig-engine export`: ONNX (and TensorRT) export of a checkpoint, or a check of a MODEL_DIR."""
import click

_PRECISIONS = click.Choice(["fp32", "fp16", "bf16"])
_BACKENDS = click.Choice(["auto", "torch", "onnxruntime", "tensorrt"])


@click.command("export")
@click.argument("checkpoint", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--output", "model_dir", type=click.Path(file_okay=False),
              help="MODEL_DIR to write (new, empty, or a previous export, which is replaced).")
@click.option("--precision", "precisions", multiple=True, type=_PRECISIONS,
              help="Also export and check this precision (repeatable; fp32 always is).")
@click.option("--tensorrt", is_flag=True, help="Also build TensorRT engines in MODEL_DIR/engines.")
@click.option("--preset", default=None, help="Preset name in export/presets.json, or a JSON file.")
@click.option("--polar", "polar_transform", type=click.Choice(["preprocess", "graph"]),
              default=None, help="Where the polar transform runs [default: the preset's, "
                                 "'preprocess'].")
@click.option("--opset", type=int, default=18, show_default=True,
              help="ONNX opset (the bf16 graphs use 22).")
@click.option("--sample-ground", multiple=True, type=click.Path(dir_okay=False),
              help="A real ground photo for the parity checks (repeatable).")
@click.option("--sample-aerial", multiple=True, type=click.Path(dir_okay=False),
              help="A real overhead tile for the parity checks (repeatable).")
@click.option("--verify", "verify_dir", type=click.Path(file_okay=False),
              help="Instead of exporting: check MODEL_DIR's hashes and run a batch through "
                   "--backend against PyTorch.")
@click.option("--backend", type=_BACKENDS, default="auto", show_default=True,
              help="With --verify: the backend to check.")
@click.option("--device", default="auto", show_default=True,
              help="With --verify: auto, cpu, cuda or cuda:N.")
@click.option("--strict", is_flag=True,
              help="With --verify: an onnxruntime provider downgrade is an error.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def export_command(checkpoint, model_dir, precisions, tensorrt, preset, polar_transform, opset,
                   sample_ground, sample_aerial, verify_dir, backend, device, strict, quiet):
    """Export CHECKPOINT's encoders to ONNX in MODEL_DIR, with parity checks and a manifest.

    \b
    cvig-engine export run/best.safetensors -o model_dir --precision fp16 [--tensorrt]
    cvig-engine export --verify model_dir --backend onnxruntime [--device cuda --strict]
    """
    import json
    import logging

    from cvig_engine.errors import CvigInputError
    from cvig_engine.export import ExportCheckError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if verify_dir:
            summary = _verify(verify_dir, checkpoint, model_dir, precisions, backend, device,
                              strict)
        else:
            if not checkpoint or not model_dir:
                raise CvigInputError("usage: cvig-engine export CHECKPOINT -o MODEL_DIR "
                                     "(or --verify MODEL_DIR)")
            from cvig_engine.export import export_model

            samples = None
            if sample_ground or sample_aerial:
                samples = {"ground": list(sample_ground), "aerial": list(sample_aerial)}
            manifest = export_model(checkpoint, model_dir, precision=list(precisions) or ["fp32"],
                                    tensorrt=tensorrt, opset=opset, preset=preset,
                                    progress=not quiet, polar_transform=polar_transform,
                                    sample_images=samples)
            summary = _summary(model_dir, manifest)
    except ExportCheckError as error:
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps(summary, indent=2))


def _verify(verify_dir, checkpoint, model_dir, precisions, backend, device, strict) -> dict:
    from cvig_engine.backends import verify_model_dir
    from cvig_engine.errors import CvigInputError

    if checkpoint or model_dir:
        raise CvigInputError("--verify MODEL_DIR takes no CHECKPOINT and no -o")
    if len(precisions) > 1:
        raise CvigInputError("--verify checks one --precision at a time")
    return verify_model_dir(verify_dir, backend=backend, device=device,
                            precision=precisions[0] if precisions else "fp32", strict=strict)


def _summary(model_dir, manifest) -> dict:
    parity = manifest["parity"]
    summary = {
        "model_dir": str(model_dir),
        "model_sha256": manifest["model_sha256"],
        "aerial_input_kind": manifest["aerial_input_kind"],
        "parity_max_abs": max(entry["max_abs"] for role in ("ground", "aerial")
                              for entry in parity[role].values()),
        "cosine_min": {name: entry["cosine"]["cosine_min"]
                       for name, entry in manifest["precisions"].items()},
        "files": sorted(manifest["files"]),
    }
    if "tensorrt" in manifest:
        summary["tensorrt"] = sorted(manifest["tensorrt"]["engines"])
    return summary

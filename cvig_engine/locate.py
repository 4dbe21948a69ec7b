"""Locate new photos: embed them, score them against a tile gallery, report the top-K tiles.

The photos are scored by the same engine as ``cvig-engine score`` (exact orientation search,
WITW tie rule), so a photo's candidates are exactly what scoring a store holding it would give.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from cvig_engine.errors import CvigInputError


def _encode_photos(backend, photos, config, photo_fov):
    from cvig_engine.data import load_image, preprocess_ground

    batch = [preprocess_ground(load_image(path), config, image_fov_deg=photo_fov).numpy()
             for path in photos]
    return backend.encode_ground(np.stack(batch)).astype(np.float32)


def locate_photos(photos, tiles, model_dir, *, topk: int = 10, backend: str = "auto",
                  device: str = "auto", photo_fov: float | None = None, plot=None) -> dict:
    """Top-K candidate tiles for each photo.

    Args:
        photos: image paths (taken with the model's field of view, or 360 deg panoramas when
            ``photo_fov=360``, which are cropped at their left edge facing south).
        tiles: a feature store (``cvig-engine embed``) whose ``/aerial`` rows are the gallery.
        model_dir: the exported model that made ``tiles``.
        topk: candidates per photo.
        photo_fov: the photos' field of view (default: the model's).
        plot: write a scatter plot of the candidates on lat/lon axes to this PNG.

    Returns:
        ``{"model_sha256", "tiles", "photos": [{"photo", "candidates": [{"rank", "tile_id", "lat",
        "lon", "distance", "shift", "heading_deg"}]}]}``; headings are compass degrees of the
        photo's centre (``cvig_engine.polar.shift_to_heading``).
    """
    from cvig_engine.backends import open_backend
    from cvig_engine.export import read_manifest
    from cvig_engine.polar import shift_to_heading
    from cvig_engine.scoring import score_feature_store
    from cvig_engine.store import open_feature_store, write_feature_store

    photos = [Path(path) for path in photos]
    if not photos:
        raise CvigInputError("locate needs at least one photo")
    manifest = read_manifest(model_dir)
    with open_feature_store(tiles) as store:
        if store.num_aerial == 0:
            raise CvigInputError(f"{tiles}: the feature store holds no aerial tiles")
        found = store.attributes.get("model_sha256")
        if found != manifest["model_sha256"]:
            raise CvigInputError(f"{tiles}: made by another model (model_sha256 {found!r}, "
                                 f"{model_dir} has {manifest['model_sha256']!r})")
        aerial = store.aerial_features()
        aerial_ids = list(store.aerial_ids) if store.aerial_ids is not None else \
            [str(row) for row in range(store.num_aerial)]
        aerial_lat, aerial_lon = (_coordinates(store.optional(name), store.num_aerial)
                                  for name in ("aerial/lat", "aerial/lon"))
        attributes = {key: store.attributes[key]
                      for key in ("model_sha256", "model_config", "fov_deg")
                      if key in store.attributes}
    engine = open_backend(model_dir, backend=backend, device=device)
    try:
        config = engine.config
        ground = _encode_photos(engine, photos, config, photo_fov)
        attributes.update(backend=engine.name, precision=engine.precision)
    finally:
        engine.close()
    with tempfile.TemporaryDirectory(prefix="cvig-locate-") as work:
        features = Path(work) / "features.h5"
        scores = Path(work) / "scores.h5"
        write_feature_store(features, ground_features=ground, aerial_features=aerial,
                            match=np.full(len(photos), -1), ground_ids=[str(p) for p in photos],
                            aerial_ids=aerial_ids, aerial_lat=aerial_lat, aerial_lon=aerial_lon,
                            attrs=attributes)
        score_feature_store(features, scores, topk=topk, device=device, progress=False)
        import h5py

        with h5py.File(scores, "r") as handle:
            index = handle["topk/index"][()]
            distance = handle["topk/distance"][()]
            shift = handle["topk/shift"][()]
    fov, width = float(config["fov"]), int(aerial.shape[-1])
    result = {"model_sha256": manifest["model_sha256"], "tiles": str(tiles), "photos": []}
    for row, photo in enumerate(photos):
        candidates = []
        for rank, (tile, tile_distance, tile_shift) in enumerate(
                zip(index[row], distance[row], shift[row]), 1):
            if tile < 0:
                continue
            candidates.append({
                "rank": rank, "tile_id": aerial_ids[tile], "tile_row": int(tile),
                "lat": _number(aerial_lat[tile]), "lon": _number(aerial_lon[tile]),
                "distance": float(tile_distance), "shift": int(tile_shift),
                "heading_deg": round(float(shift_to_heading(int(tile_shift), fov, width)), 3)})
        result["photos"].append({"photo": str(photo), "candidates": candidates})
    if plot:
        plot_candidates(result, aerial_lat, aerial_lon, plot)
        result["plot"] = str(plot)
    return result


def _coordinates(values, count: int) -> np.ndarray:
    """A store's lat or lon column as float64, NaN when the store has none."""
    return np.full(count, np.nan) if values is None else np.asarray(values, dtype=np.float64)


def _number(value):
    return None if not np.isfinite(value) else float(value)


def plot_candidates(result: dict, gallery_lat, gallery_lon, path) -> Path:
    """Scatter plot: the gallery in grey, each photo's candidates coloured by distance, best
    starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not np.isfinite(gallery_lat).any():
        raise CvigInputError("the tile gallery has no lat/lon: nothing to plot")
    figure, axes = plt.subplots(figsize=(8, 6), dpi=120)
    axes.scatter(gallery_lon, gallery_lat, s=6, c="0.8", label="tiles")
    colour_map = None
    for photo in result["photos"]:
        points = [c for c in photo["candidates"] if c["lat"] is not None]
        if not points:
            continue
        colour_map = axes.scatter([c["lon"] for c in points], [c["lat"] for c in points],
                                  c=[c["distance"] for c in points], cmap="viridis_r", s=40,
                                  edgecolors="k", linewidths=0.4)
        best = points[0]
        axes.scatter([best["lon"]], [best["lat"]], marker="*", s=220, c="red", edgecolors="k",
                     label=f"best: {Path(photo['photo']).name}")
    if colour_map is not None:
        figure.colorbar(colour_map, ax=axes, label="distance (lower is closer)")
    axes.set_xlabel("longitude")
    axes.set_ylabel("latitude")
    axes.set_title("Candidate tiles per photo")
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def format_json(result: dict) -> str:
    return json.dumps(result, indent=2)

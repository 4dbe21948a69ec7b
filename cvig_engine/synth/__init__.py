"""The procedural cross-view world: cities as 2.5-D maps, street-level and overhead renders.

    from cvig_engine.synth import SynthSettings, synthesize
    synthesize("demo-data", SynthSettings(pairs=200, cities=3))

See ``city`` (the map), ``render`` (the two views and the heading convention), ``dataset``
(locations, files) and ``baseline`` (the colour-histogram difficulty check).
"""

from cvig_engine.synth.baseline import colour_histogram_baseline, colour_histograms
from cvig_engine.synth.city import City, generate_city
from cvig_engine.synth.dataset import (
    SynthPair,
    build_city,
    render_pairs,
    sample_locations,
    synthesize,
    write_jpeg,
    write_png,
)
from cvig_engine.synth.figure import sample_figure
from cvig_engine.synth.render import (
    View,
    column_azimuths,
    render_closeup,
    render_surface,
    render_tile,
    sample_surface_conditions,
    sample_tile_conditions,
)
from cvig_engine.synth.settings import SynthSettings
from cvig_engine.synth.style import CityStyle, Sun, sample_style

__all__ = [
    "SynthSettings",
    "synthesize",
    "build_city",
    "render_pairs",
    "sample_locations",
    "SynthPair",
    "City",
    "generate_city",
    "CityStyle",
    "Sun",
    "sample_style",
    "View",
    "render_surface",
    "render_tile",
    "render_closeup",
    "sample_surface_conditions",
    "sample_tile_conditions",
    "column_azimuths",
    "colour_histograms",
    "colour_histogram_baseline",
    "write_jpeg",
    "write_png",
    "sample_figure",
]

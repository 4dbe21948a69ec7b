"""Dataset CSVs, image and mask loading, preprocessing and the torch dataset."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cvig_engine.data import (
    PairRecord,
    check_images,
    crop_panorama,
    load_image,
    load_mask,
    preprocess_aerial,
    preprocess_ground,
    read_dataset,
    write_cvusa_csv,
    write_witw_csv,
)
from cvig_engine.errors import CvigInputError
from cvig_engine.model import model_config
from cvig_engine.polar import heading_to_shift
from references import polar_reference

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _config(fov=360.0, in_channels=3, polar_width=32):
    """A small model config: tiles resized to 16 x 16, polar 8 x polar_width, ground 8 px high."""
    return model_config(
        "tiny",
        fov=fov,
        in_channels=in_channels,
        aerial_size=16,
        ground_height=8,
        polar_height=8,
        polar_width=polar_width,
    )


def _save(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


@pytest.fixture
def pairs(tmp_path):
    """Three pairs of small PNGs (panoramas 8 x 32, tiles 16 x 16) with masks."""
    rng = np.random.default_rng(0)
    records = []
    for index in range(3):
        folder = tmp_path / "images"
        folder.mkdir(exist_ok=True)
        surface = _save(folder / f"s{index}.png", rng.integers(0, 256, (8, 32, 3), dtype=np.uint8))
        overhead = _save(
            folder / f"o{index}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        )
        masks = {}
        for name, shape in (
            ("surface_building", (8, 32)),
            ("surface_road", (8, 32)),
            ("overhead_building", (16, 16)),
            ("overhead_road", (16, 16)),
        ):
            masks[name] = _save(
                folder / f"{name}{index}.png", (rng.random(shape) < 0.5).astype(np.uint8) * 255
            )
        records.append(
            PairRecord(
                row=0,
                surface=surface,
                overhead=overhead,
                lat=40.0 + index / 3,
                lon=-3.25,
                heading=[0.0, 12.5, math.nan][index],
                fov=360.0,
                city=["A", "B", ""][index],
                usable=index != 1,
                masks=masks,
                extra={"note": f"n{index}"},
            )
        )
    return records


# -- CSV -------------------------------------------------------------------------------------------


def test_witw_csv_round_trip_with_relative_paths_masks_and_extras(tmp_path, pairs):
    path = tmp_path / "data.csv"
    write_witw_csv(path, pairs)
    text = path.read_text().splitlines()
    assert text[0].startswith("surface,overhead,lat,lon,heading,fov,city,usable,surface_building")
    assert text[1].startswith("images/s0.png,images/o0.png,")  # relative to the CSV's folder
    back = read_dataset(path)
    assert [r.row for r in back] == [2, 3, 4]
    for original, read in zip(pairs, back):
        assert read.surface == original.surface and read.overhead == original.overhead
        assert read.lat == original.lat and read.lon == original.lon  # floats round-trip exactly
        assert read.heading == original.heading or (
            math.isnan(read.heading) and math.isnan(original.heading)
        )
        assert (read.fov, read.city, read.usable) == (original.fov, original.city, original.usable)
        assert read.masks == original.masks and read.extra == original.extra
        assert read.csv_path == path


def test_absolute_paths_outside_the_folder_stay_absolute(tmp_path, pairs):
    path = tmp_path / "sub" / "data.csv"
    write_witw_csv(path, pairs)
    assert str(tmp_path / "images" / "s0.png") in path.read_text()
    assert read_dataset(path)[0].surface == pairs[0].surface


def test_cvusa_layout_round_trip_and_third_column_ignored(tmp_path, pairs):
    path = tmp_path / "split.csv"
    write_cvusa_csv(path, pairs)
    assert path.read_text().splitlines()[0] == "images/o0.png,images/s0.png"
    back = read_dataset(path)
    assert [(r.overhead, r.surface) for r in back] == [(p.overhead, p.surface) for p in pairs]
    assert all(r.fov == 360.0 and r.heading == 0.0 and r.usable and math.isnan(r.lat) for r in back)
    (tmp_path / "three.csv").write_text(
        "bing/1.jpg,street/1.jpg,annotations/1.png\n\nbing/2.jpg,street/2.jpg,x\n"
    )
    three = read_dataset(tmp_path / "three.csv")
    assert [r.row for r in three] == [1, 3]
    assert three[1].surface == tmp_path / "street" / "2.jpg"


HEADER = "surface,overhead,lat,lon,heading,fov,city,usable\n"


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty CSV"),
        ("\n\n", "empty CSV"),
        (HEADER, "no data rows"),
        (
            "surface,overhead,lat,lon,heading,city,usable\na.png,b.png,1,2,3,x,1\n",
            "missing column(s) fov",
        ),
        (
            HEADER + "a.png,b.png,1,2,3,70,x,1\na.png,b.png,north,2,3,70,x,1\n",
            "row 3: lat 'north' is not a number",
        ),
        (HEADER + "a.png,b.png,1,2,3,0,x,1\n", "row 2: fov 0.0 outside (0, 360]"),
        (HEADER + "a.png,b.png,1,2,3,361,x,1\n", "fov 361.0 outside"),
        (HEADER + "a.png,b.png,1,2,3,,x,1\n", "row 2: empty fov"),
        (HEADER + "a.png,b.png,91,2,3,70,x,1\n", "lat 91.0 outside"),
        (HEADER + "a.png,b.png,1,2,nan,70,x,1\n", "heading 'nan' is not finite"),
        (HEADER + "a.png,b.png,1,2,3,70,x,maybe\n", "usable 'maybe'"),
        (HEADER + "a.png,b.png,1,2,3,70,x\n", "7 fields but the header has 8"),
        (HEADER + ",b.png,1,2,3,70,x,1\n", "empty surface path"),
        ("only_one_column.png\n", "needs 2 columns"),
    ],
)
def test_bad_csvs_name_file_row_and_reason(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(CvigInputError) as error:
        read_dataset(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_missing_csv_file(tmp_path):
    with pytest.raises(CvigInputError, match="not found"):
        read_dataset(tmp_path / "nope.csv")


# -- images and masks ------------------------------------------------------------------------------


def test_load_image_conversions_against_hand_computed_values(tmp_path):
    grey = np.array([[0, 100], [200, 255]], np.uint8)
    np.testing.assert_array_equal(
        load_image(_save(tmp_path / "g.png", grey)), np.stack([grey] * 3, axis=-1)
    )
    rgba = np.array(
        [[[200, 100, 50, 255], [200, 100, 50, 128]], [[10, 20, 30, 0], [255, 255, 255, 51]]],
        np.uint8,
    )
    expected = np.array([[[200, 100, 50], [100, 50, 25]], [[0, 0, 0], [51, 51, 51]]], np.uint8)
    np.testing.assert_array_equal(load_image(_save(tmp_path / "a.png", rgba)), expected)
    sixteen = np.array([[0, 257], [32768, 65535]], np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "w.png")
    np.testing.assert_array_equal(load_image(tmp_path / "w.png")[..., 0], [[0, 1], [128, 255]])
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    palette.putpalette([10, 20, 30, 200, 150, 100] + [0] * 762)
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), [[[10, 20, 30], [200, 150, 100]]])


def test_load_image_errors_name_path_csv_and_row(tmp_path):
    with pytest.raises(
        CvigInputError, match=r"missing\.png \(data\.csv: row 7\): image file not found"
    ):
        load_image(tmp_path / "missing.png", csv_path="data.csv", row=7)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(CvigInputError, match="broken.png.*cannot decode"):
        load_image(tmp_path / "broken.png")


def test_load_mask_png_and_npy_variants(tmp_path):
    np.testing.assert_array_equal(
        load_mask(_save(tmp_path / "m255.png", np.array([[0, 255]], np.uint8))), [[0, 1]]
    )
    np.testing.assert_array_equal(
        load_mask(_save(tmp_path / "m1.png", np.array([[0, 1]], np.uint8))), [[0, 1]]
    )
    np.testing.assert_allclose(
        load_mask(_save(tmp_path / "soft.png", np.array([[0, 51, 255]], np.uint8))), [[0, 0.2, 1]]
    )
    np.save(tmp_path / "f.npy", np.array([[0.25, 0.5]], np.float32))
    np.testing.assert_array_equal(load_mask(tmp_path / "f.npy"), [[0.25, 0.5]])
    np.save(tmp_path / "b.npy", np.array([[True, False]]))
    np.testing.assert_array_equal(load_mask(tmp_path / "b.npy"), [[1, 0]])
    np.save(tmp_path / "bad.npy", np.array([[0.5, 2.0]]))
    with pytest.raises(CvigInputError, match=r"\[0, 1\]"):
        load_mask(tmp_path / "bad.npy")
    with pytest.raises(CvigInputError, match="single-channel"):
        load_mask(_save(tmp_path / "colour.png", np.array([[[255, 0, 0]]], np.uint8)))


def test_check_images_flags_bad_files_once_and_skip_bad(tmp_path, pairs):
    (tmp_path / "images" / "o1.png").write_bytes(b"garbage")
    pairs[2].masks["surface_road"].unlink()
    path = tmp_path / "data.csv"
    write_witw_csv(path, pairs)
    records = read_dataset(path)
    with pytest.raises(CvigInputError) as error:
        check_images(records, progress=False)
    message = str(error.value)
    assert (
        "2 of 3 pairs" in message
        and "row 3: overhead" in message
        and "row 4: surface_road" in message
    )
    good, bad = check_images(records, skip_bad=True, progress=False)
    assert [r.row for r in good] == [2] and [r.row for r, _ in bad] == [3, 4]
    assert "file not found" in bad[1][1]


# -- preprocessing ---------------------------------------------------------------------------------


def test_crop_panorama_heading_convention_and_wrap_around():
    panorama = np.arange(64)[None, :, None].repeat(2, axis=0)  # column index as the value
    for heading in (0.0, 90.0, 200.0, 359.0):
        crop, centre = crop_panorama(panorama, 90.0, heading_deg=heading)
        start = heading_to_shift(heading, 90.0, 64)
        np.testing.assert_array_equal(crop[0, :, 0], (start + np.arange(16)) % 64)
        assert heading_to_shift(centre, 90.0, 64) == start
        assert abs((centre - heading + 180) % 360 - 180) <= 360 / 64 / 2
    crop, centre = crop_panorama(panorama, 90.0, rng=np.random.default_rng(3))
    assert heading_to_shift(centre, 90.0, 64) == crop[0, 0, 0]
    # A panorama whose centre faces east (heading 90) is rotated accordingly.
    crop, centre = crop_panorama(panorama, 90.0, heading_deg=90.0, panorama_heading_deg=90.0)
    assert crop[0, 0, 0] == heading_to_shift(0.0, 90.0, 64) and centre == pytest.approx(90.0)


def test_preprocess_ground_normalises_crops_and_appends_masks():
    rng = np.random.default_rng(1)
    panorama = rng.integers(0, 256, (8, 128, 3), dtype=np.uint8)
    config = _config(fov=90.0, in_channels=5, polar_width=128)  # ground 8 x 32
    masks = [rng.random((8, 128)).astype(np.float32) for _ in range(2)]
    tensor = preprocess_ground(
        panorama, config, heading_offset_deg=45.0, image_fov_deg=360.0, masks=masks
    )
    assert tensor.shape == (5, 8, 32)
    start = heading_to_shift(45.0, 90.0, 128)
    columns = (start + np.arange(32)) % 128
    expected = (panorama[:, columns].astype(np.float64) / 255 - MEAN) / STD
    np.testing.assert_allclose(tensor[:3].numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    np.testing.assert_allclose(tensor[3].numpy(), masks[0][:, columns], atol=1e-6)  # mean 0, std 1
    with pytest.raises(CvigInputError, match="5 input channels"):
        preprocess_ground(panorama, config, image_fov_deg=360.0)
    with pytest.raises(CvigInputError, match="less than the model"):
        preprocess_ground(panorama[:, :10], _config(fov=90.0, polar_width=128), image_fov_deg=70.0)


def test_preprocess_aerial_matches_the_float64_polar_reference():
    rng = np.random.default_rng(2)
    tile = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    tensor = preprocess_aerial(tile, _config())
    normalised = ((tile.astype(np.float64) / 255 - MEAN) / STD).transpose(2, 0, 1)
    np.testing.assert_allclose(tensor.numpy(), polar_reference(normalised, 8, 32), atol=1e-5)
    shifted = preprocess_aerial(tile, _config(), offset_px=(2, -1))
    moved = np.pad(normalised, ((0, 0), (2, 0), (0, 1)), mode="edge")[:, :16, 1:]
    np.testing.assert_allclose(shifted.numpy(), polar_reference(moved, 8, 32), atol=1e-5)
    with pytest.raises(CvigInputError, match="square"):
        preprocess_aerial(tile[:, :12], _config())


def test_pair_dataset_crops_panoramas_and_reports_compass_headings(tmp_path, pairs):
    from cvig_engine.data import PairDataset

    path = tmp_path / "data.csv"
    write_witw_csv(path, pairs)
    records = read_dataset(path)
    config = _config(fov=90.0)  # ground 8 x 8: a quarter of the 8 x 32 panoramas, no resizing
    evaluation = PairDataset(records, config, train=False, seed=0)
    assert isinstance(evaluation, torch.utils.data.Dataset) and len(evaluation) == 3
    first, again = evaluation[1], evaluation[1]
    assert torch.equal(first["ground"], again["ground"]) and first["ground"].shape == (3, 8, 8)
    assert first["aerial"].shape == (3, 8, 32)
    # The crop's compass heading: the record's heading plus the crop's offset from the centre.
    panorama = load_image(records[1].surface)
    start = heading_to_shift(first["heading"] - records[1].heading, 90.0, 32)
    expected = (panorama[:, (start + np.arange(8)) % 32].astype(np.float64) / 255 - MEAN) / STD
    np.testing.assert_allclose(first["ground"].numpy(), expected.transpose(2, 0, 1), atol=1e-5)
    assert math.isnan(evaluation[2]["heading"])  # unknown heading stays unknown
    training = PairDataset(records, config, train=True, seed=0)
    crops = {training.item(0, epoch=epoch)["heading"] for epoch in range(6)}
    assert len(crops) > 1  # new random crops every epoch
    assert training.item(0, epoch=4)["heading"] == training.item(0, epoch=4)["heading"]


def test_pair_dataset_five_channels_needs_masks(tmp_path, pairs):
    from cvig_engine.data import PairDataset

    config = _config(in_channels=5)
    item = PairDataset(pairs, config, train=False)[0]
    assert item["ground"].shape == (5, 8, 32) and item["aerial"].shape == (5, 8, 32)
    assert set(np.unique(item["ground"][3].numpy())) <= {0.0, 1.0}
    del pairs[0].masks["overhead_road"]
    with pytest.raises(CvigInputError, match="overhead_road"):
        PairDataset(pairs, config, train=False)
    with pytest.raises(CvigInputError, match="covers 70 deg"):
        PairDataset(
            [PairRecord(row=2, surface=pairs[1].surface, overhead=pairs[1].overhead, fov=70.0)],
            _config(fov=90.0),
            train=False,
        )


@pytest.mark.parametrize("ground_fov, view_fov, width", [(None, 90.0, 8), (360.0, 360.0, 32)])
def test_training_crops_keep_the_mask_columns_with_the_photo_columns(pairs, ground_fov, view_fov,
                                                                     width):
    """The 5-channel training views (random crops of the model's width, or wider ones cut for
    --warmup-fov / --extra-fov) take the masks' columns where they take the photo's."""
    from cvig_engine.data import PairDataset

    training = PairDataset(pairs[:2], _config(fov=90.0, in_channels=5), train=True, seed=0)
    for index in range(2):
        panorama = load_image(pairs[index].surface).astype(np.float64)
        masks = [np.asarray(Image.open(pairs[index].masks[name])) / 255.0
                 for name in ("surface_building", "surface_road")]
        starts = set()
        for epoch in range(4):
            item = training.item(index, epoch=epoch, ground_fov=ground_fov)
            assert item["ground"].shape == (5, 8, width)
            start = heading_to_shift(item["heading"] - pairs[index].heading, view_fov, 32)
            columns = (start + np.arange(width)) % 32
            expected = (panorama[:, columns] / 255 - MEAN) / STD
            np.testing.assert_allclose(item["ground"][:3].numpy(), expected.transpose(2, 0, 1),
                                       atol=1e-5)
            for channel, mask in zip((3, 4), masks):
                np.testing.assert_array_equal(item["ground"][channel].numpy(), mask[:, columns])
            starts.add(int(start))
        assert len(starts) > 1  # the crops move between epochs


@pytest.mark.parametrize("fov, channels", [(90.0, 3), (360.0, 3), (360.0, 5)])
def test_pair_dataset_cache_gives_the_same_items_and_reads_each_file_once(tmp_path, pairs, fov,
                                                                          channels, monkeypatch):
    from cvig_engine import data
    from cvig_engine.data import PairDataset

    config = _config(fov=fov, in_channels=channels)
    plain = PairDataset(pairs, config, train=True, seed=3, tile_offset_px=2.0)
    cached = PairDataset(pairs, config, train=True, seed=3, tile_offset_px=2.0, cache_bytes=1 << 30)
    reads = []
    original = data.load_image
    monkeypatch.setattr(data, "load_image", lambda path, **kw: reads.append(path) or original(path, **kw))
    for epoch in range(3):
        for index in range(len(pairs)):
            expected, found = plain.item(index, epoch=epoch), cached.item(index, epoch=epoch)
            for key in ("ground", "aerial"):
                assert torch.equal(expected[key], found[key]), (epoch, index, key)
            assert expected["heading"] == found["heading"] or math.isnan(expected["heading"])
    # The uncached dataset reads both images of every pair every epoch; the cached one once.
    uncached_reads = 3 * 2 * len(pairs)
    assert len(reads) == uncached_reads + 2 * len(pairs)
    evaluation = PairDataset(pairs, config, train=False, seed=3, cache_bytes=1 << 30)
    first = evaluation[0]["ground"]
    assert evaluation[0]["ground"] is first  # deterministic inputs are kept as tensors
    # A budget for one pair's inputs: the first pair is kept, the others are read every time.
    budget = first.nbytes + evaluation[0]["aerial"].nbytes
    small = PairDataset(pairs, config, train=False, seed=3, cache_bytes=budget)
    for index in range(len(pairs)):
        assert torch.equal(small[index]["ground"], evaluation[index]["ground"])
    assert small.cached_bytes == budget and small[0]["ground"] is small[0]["ground"]
    assert small[1]["ground"] is not small[1]["ground"]


def test_prefetch_fills_the_cache_with_what_item_computes_and_stops_when_asked(pairs, tmp_path):
    import threading

    from cvig_engine.data import PairDataset

    config = _config(fov=90.0)
    plain = PairDataset(pairs, config, train=True, seed=5, tile_offset_px=2.0)
    warmed = PairDataset(pairs, config, train=True, seed=5, tile_offset_px=2.0, cache_bytes=1 << 30)
    thread = threading.Thread(target=warmed.prefetch, args=([2, 0, 1], 0))
    thread.start()
    thread.join()
    assert {key[0] for key in warmed.cache} == {"ground", "overhead"}  # tiles: random offsets
    assert {key[1] for key in warmed.cache if key[0] == "ground"} == {0, 1, 2}
    for epoch in range(2):
        for index in range(3):
            expected, found = plain.item(index, epoch=epoch), warmed.item(index, epoch=epoch)
            for key in ("ground", "aerial"):
                assert torch.equal(expected[key], found[key]), (epoch, index, key)
    stop = threading.Event()
    stop.set()
    idle = PairDataset(pairs, config, train=True, cache_bytes=1 << 30)
    assert idle.prefetch([0, 1, 2], stop=stop) == 0 and not idle.cache
    assert PairDataset(pairs, config, train=True).prefetch([0, 1, 2]) == 0  # no cache: nothing
    # An unreadable pair ends the prefetch there; item() reports it with its file and row.
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    records = [pairs[0], PairRecord(row=9, surface=broken, overhead=pairs[1].overhead), pairs[2]]
    dataset = PairDataset(records, config, train=True, cache_bytes=1 << 30)
    assert dataset.prefetch([0, 1, 2]) == 1
    with pytest.raises(CvigInputError, match="broken.png"):
        dataset.item(1)


def test_training_rolls_full_panoramas_to_random_headings(pairs):
    from cvig_engine.data import PairDataset

    config = _config(fov=360.0)
    fixed = PairDataset(pairs, config, train=False)[0]
    training = PairDataset(pairs, config, train=True, seed=1, cache_bytes=1 << 30)
    width = fixed["ground"].shape[-1]
    headings = set()
    for epoch in range(8):
        item = training.item(0, epoch=epoch)
        # The heading moved by r columns clockwise: column j now shows the fixed view's j + r.
        columns = round((item["heading"] - fixed["heading"]) % 360.0 / (360.0 / width)) % width
        expected = fixed["ground"][..., (np.arange(width) + columns) % width]
        assert torch.equal(item["ground"], expected)
        assert torch.equal(item["aerial"], fixed["aerial"])
        headings.add(item["heading"])
    assert len(headings) > 1


@pytest.mark.parametrize("polar_width", [32, 64])  # panoramas 32 wide: kept, or resized
def test_training_cuts_windows_of_any_width_out_of_the_resized_panorama(pairs, polar_width):
    from cvig_engine.data import PairDataset

    config = _config(fov=90.0, polar_width=polar_width)
    training = PairDataset(pairs, config, train=True, seed=2, cache_bytes=1 << 30)
    # The whole panorama as the model sees it (resized, normalised), heading as in the CSV.
    whole = PairDataset(pairs, _config(fov=360.0, polar_width=polar_width), train=False)[1]
    assert whole["heading"] == pairs[1].heading
    for ground_fov in (90.0, 180.0, 360.0):
        width = int(ground_fov / 360.0 * polar_width)
        starts = set()
        for epoch in range(5):
            item = training.item(1, epoch=epoch, ground_fov=ground_fov)
            start = heading_to_shift(item["heading"] - pairs[1].heading, ground_fov, polar_width)
            expected = whole["ground"][..., (start + np.arange(width)) % polar_width]
            assert torch.equal(item["ground"], expected), (ground_fov, epoch)
            assert torch.equal(item["aerial"], whole["aerial"])
            starts.add(start)
        assert len(starts) > 1
    # Without ground_fov: the model's field of view.
    assert training.item(1, epoch=0)["ground"].shape[-1] == polar_width // 4
    evaluation = PairDataset(pairs, config, train=False)
    with pytest.raises(CvigInputError, match="only training on 360 deg panoramas"):
        evaluation.item(1, ground_fov=360.0)
    photo = PairRecord(row=7, surface=pairs[1].surface, overhead=pairs[1].overhead, fov=90.0)
    with pytest.raises(CvigInputError, match="row 7: only training"):
        PairDataset([photo], config, train=True).item(0, ground_fov=180.0)


@pytest.mark.parametrize("channels", [3, 5])
def test_colour_jitter_is_a_seeded_per_channel_affine_map_of_the_plain_views(pairs, channels):
    from cvig_engine.data import PairDataset, jitter_colours

    config = _config(fov=90.0, in_channels=channels)
    plain = PairDataset(pairs, config, train=True, seed=4, tile_offset_px=2.0)
    jittered = PairDataset(pairs, config, train=True, seed=4, tile_offset_px=2.0, colour_jitter=0.3,
                           cache_bytes=1 << 30)
    for epoch in range(2):
        for index in range(len(pairs)):
            expected, found = plain.item(index, epoch=epoch), jittered.item(index, epoch=epoch)
            # Drawn by hand from the documented stream: ground gains, ground shifts, then aerial.
            rng = np.random.default_rng([4, epoch, index, 1])
            for key in ("ground", "aerial"):
                gain = np.exp(rng.normal(0.0, 0.3, 3))
                shift = rng.normal(0.0, 0.3, 3)
                for channel in range(3):
                    plain_channel = expected[key][channel].double().numpy()
                    reference = plain_channel * gain[channel] + shift[channel]
                    np.testing.assert_allclose(found[key][channel].numpy(), reference, atol=1e-5)
                # Masks keep their values; geometry (crop, offset, heading) is the plain one's.
                assert torch.equal(found[key][3:], expected[key][3:])
            np.testing.assert_equal(found["heading"], expected["heading"])  # NaN: no heading
    # A new epoch draws new colours; the cached plain inputs are not modified.
    assert not torch.equal(jittered.item(0, epoch=0)["ground"], jittered.item(0, epoch=1)["ground"])
    assert torch.equal(jittered.item(0, epoch=0)["ground"], jittered.item(0, epoch=0)["ground"])
    evaluation = PairDataset(pairs, config, train=False, seed=4, colour_jitter=0.3)
    unjittered = PairDataset(pairs, config, train=False, seed=4)
    assert torch.equal(evaluation[0]["ground"], unjittered[0]["ground"])
    view = torch.ones(channels, 2, 2)
    assert torch.equal(jitter_colours(view, 0.0, np.random.default_rng(0)), view)
    with pytest.raises(CvigInputError, match="colour jitter"):
        PairDataset(pairs, config, train=True, colour_jitter=-0.1)

"""The feature store reader (checks) and the whole-array writer."""
import hashlib
import json

import h5py
import numpy as np
import pytest

from cvig_engine.errors import CvigInputError
from cvig_engine.store import file_sha256, open_feature_store, write_feature_store


def _arrays(rng, num_ground=6, num_aerial=5):
    return {"ground_features": rng.standard_normal((num_ground, 4, 2, 3)),
            "aerial_features": rng.standard_normal((num_aerial, 4, 2, 8)),
            "match": np.arange(num_ground) % num_aerial}


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    arrays = _arrays(rng)
    heading = np.array([10.0, np.nan, 30.0, 40.0, 50.0, 60.0])
    write_feature_store(tmp_path / "f.h5", **arrays, ground_ids=[f"g{i}" for i in range(6)],
                        aerial_ids=[f"a{i}" for i in range(5)], heading=heading,
                        ground_lat=np.linspace(48, 49, 6), ground_lon=np.linspace(2, 3, 6),
                        attrs={"model_config": {"fov": 70.0, "vertical_search": False},
                               "fov_deg": 70.0, "city": "paris"}, dtype=dtype)
    with open_feature_store(tmp_path / "f.h5") as store:
        assert (store.num_ground, store.num_aerial) == (6, 5)
        assert store.ground_shape == (4, 2, 3) and store.aerial_shape == (4, 2, 8)
        assert store.ground_ids[1] == "g1" and store.aerial_ids[4] == "a4"
        np.testing.assert_array_equal(store.match, arrays["match"])
        np.testing.assert_array_equal(store.heading, heading.astype(np.float32))
        tolerance = 1e-3 if dtype == np.float16 else 1e-7
        np.testing.assert_allclose(store.ground_features(2, 4), arrays["ground_features"][2:4],
                                   rtol=tolerance, atol=tolerance)
        np.testing.assert_allclose(store.aerial_features(), arrays["aerial_features"],
                                   rtol=tolerance,
                                   atol=tolerance)
        assert store.aerial_dtype() == dtype
        assert store.model_config == {"fov": 70.0, "vertical_search": False}
        assert store.fov_deg == 70.0 and store.attributes["city"] == "paris"
        np.testing.assert_allclose(store.optional("ground/lat"), np.linspace(48, 49, 6))
        assert store.optional("aerial/lat") is None
        assert store.sha256 == hashlib.sha256((tmp_path / "f.h5").read_bytes()).hexdigest()


def test_file_sha256_reads_in_blocks(tmp_path):
    data = np.random.default_rng(1).bytes(3 * (1 << 20) + 17)
    (tmp_path / "blob").write_bytes(data)
    assert file_sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def _edit(path, function):
    with h5py.File(path, "r+") as handle:
        function(handle)


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.attrs.__setitem__("format", "something-else"), "not a cvig-engine feature store"),
    (lambda h: h.attrs.__setitem__("format_version", 7), "format_version 7 is not supported"),
    (lambda h: h.attrs.__setitem__("model_config", "{oops"), "model_config is not valid JSON"),
    (lambda h: h.__delitem__("ground/match"), "/ground/match is missing"),
    (lambda h: (h.__delitem__("ground/match"),
                h.create_dataset("ground/match", data=np.zeros(4, int))),
     "/ground/match has 4 rows"),
    (lambda h: (h.__delitem__("ground/match"), h.create_dataset("ground/match", data=np.zeros(6))),
     "must be integers"),
    (lambda h: (h.__delitem__("ground/ids"), h.create_dataset("ground/ids",
                                                              data=np.array([b"x"] * 2))),
     "/ground/ids has shape (2,)"),
    (lambda h: (h.__delitem__("aerial/features"), h.create_dataset("aerial/features",
                                                                   data=np.zeros((5, 4, 8)))),
     "/aerial/features must have 4 dimensions"),
    (lambda h: (h.__delitem__("aerial/features"),
                h.create_dataset("aerial/features", data=np.zeros((5, 4, 2, 8), dtype=np.int32))),
     "features must be float16 or float32"),
    (lambda h: h.create_dataset("aerial/done", data=np.array([1, 1, 0, 1, 0], dtype=np.uint8)),
     "2 of 5 rows of /aerial are not embedded yet (first: row 2)"),
    (lambda h: h.attrs.__setitem__("complete", False), "complete = false"),
])
def test_bad_stores_are_refused_with_a_clear_message(tmp_path, edit, message):
    path = write_feature_store(tmp_path / "f.h5", **_arrays(np.random.default_rng(2)))
    _edit(path, edit)
    with pytest.raises(CvigInputError) as error:
        open_feature_store(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_incomplete_store_opens_when_asked(tmp_path):
    path = write_feature_store(tmp_path / "f.h5", **_arrays(np.random.default_rng(3)))
    _edit(path, lambda h: h.create_dataset("ground/done", data=np.zeros(6, dtype=bool)))
    with open_feature_store(path, require_complete=False) as store:
        assert store.num_ground == 6


def test_vertical_search_allows_a_taller_aerial_map(tmp_path):
    rng = np.random.default_rng(4)
    arrays = _arrays(rng)
    arrays["aerial_features"] = rng.standard_normal((5, 4, 4, 8))
    path = write_feature_store(tmp_path / "f.h5", **arrays,
                               attrs={"model_config": {"vertical_search": True}})
    with open_feature_store(path) as store:
        assert store.vertical_search and store.aerial_shape == (4, 4, 8)
    write_feature_store(path, **arrays)
    with pytest.raises(CvigInputError, match="vertical search is off"):
        open_feature_store(path)


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(CvigInputError, match="no such feature store"):
        open_feature_store(tmp_path / "absent.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(CvigInputError, match="not a readable HDF5 file"):
        open_feature_store(tmp_path / "text.h5")


def test_writer_defaults(tmp_path):
    path = write_feature_store(tmp_path / "f.h5", **_arrays(np.random.default_rng(5)))
    with h5py.File(path, "r") as handle:
        assert handle.attrs["format"] == "cvig-features" and handle.attrs["format_version"] == 1
        assert handle.attrs["fov_deg"] == pytest.approx(360.0 * 3 / 8)
        assert json.loads(handle.attrs["model_config"]) == {}
        assert handle["ground/features"].dtype == np.float32
        assert [value.decode() for value in handle["aerial/ids"][()]] == ["0", "1", "2", "3", "4"]
    assert not (tmp_path / "f.h5.writing").exists()

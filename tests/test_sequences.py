import numpy as np
import pytest

from blockdrop.data.sequences import SequenceSource, load_sequence
from blockdrop.core.errors import DataError


def test_load_sequence_memory_maps_a_valid_array(tmp_path):
    data = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.save(tmp_path / "a.npy", data)
    array = load_sequence(tmp_path / "a.npy")
    assert isinstance(array, np.memmap)
    np.testing.assert_array_equal(array, data)
    assert not isinstance(load_sequence(tmp_path / "a.npy", mmap=False), np.memmap)


@pytest.mark.parametrize("array, problem", [
    (np.zeros(5, dtype=np.float32), "shape"),
    (np.zeros((2, 3, 4), dtype=np.float32), "shape"),
    (np.zeros((0, 3), dtype=np.float32), "empty"),
    (np.zeros((5, 3), dtype=np.int64), "dtype"),
    (np.array([[0.0, 1.0], [np.nan, 2.0]]), "time step 1"),
    (np.array([[0.0, np.inf]]), "non-finite"),
])
def test_load_sequence_rejects_bad_arrays_naming_the_file(tmp_path, array, problem):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(DataError, match=problem) as err:
        load_sequence(path)
    assert str(path) in str(err.value)


def test_load_sequence_rejects_non_npy_and_pickles(tmp_path):
    (tmp_path / "text.npy").write_text("hello")
    with pytest.raises(DataError, match="text.npy"):
        load_sequence(tmp_path / "text.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy"):
        load_sequence(tmp_path / "obj.npy")


def test_sequence_source(tmp_path):
    np.save(tmp_path / "v1.npy", np.ones((7, 3), dtype=np.float64))
    source = SequenceSource(tmp_path, rate=50)
    assert source.rate == 50.0
    assert source.length("v1") == 7
    array = source.load("v1")
    assert array.shape == (7, 3) and array.dtype == np.float32
    with pytest.raises(DataError) as err:
        source.load("v9")
    assert str(tmp_path / "v9.npy") in str(err.value) and "'v9'" in str(err.value)
    with pytest.raises(DataError, match="'v9'"):
        source.length("v9")


def test_sequence_source_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="rate"):
        SequenceSource(tmp_path, rate=0)
    with pytest.raises(DataError, match="absent"):
        SequenceSource(tmp_path / "absent", rate=10)
    np.save(tmp_path / "v1.feat.npy", np.ones((4, 2), dtype=np.float32))
    assert SequenceSource(tmp_path, rate=10, suffix=".feat.npy").length("v1") == 4

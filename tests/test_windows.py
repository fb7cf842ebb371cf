import numpy as np
import pytest

from blockdrop.data.windows import (
    crop_segments,
    random_truncation,
    seconds_to_steps,
    sliding_windows,
    steps_to_seconds,
)


def test_seconds_steps_round_trip_is_continuous():
    assert seconds_to_steps(1.3, 25.0) == pytest.approx(32.5)  # no rounding to a whole step
    assert steps_to_seconds(32.5, 25.0) == pytest.approx(1.3)
    t = np.array([[0.0, 1.23], [4.56, 7.891]])
    steps = seconds_to_steps(t, 29.97)
    assert steps.shape == (2, 2) and steps.dtype == np.float64
    np.testing.assert_allclose(steps_to_seconds(steps, 29.97), t, rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        seconds_to_steps(1.0, 0.0)


@pytest.mark.parametrize("length, window, stride", [
    (100, 16, 8), (100, 16, 16), (17, 16, 8), (16, 16, 8), (5, 16, 8), (1, 4, 1), (1000, 64, 48), (33, 8, 3),
])
def test_sliding_windows_cover_every_step_and_end_at_the_end(length, window, stride):
    starts = sliding_windows(length, window, stride)
    covered = np.zeros(length, dtype=bool)
    for s in starts:
        covered[s:s + window] = True
    assert covered.all()
    assert starts[0] == 0
    assert starts == sorted(set(starts))
    if length >= window:
        assert starts[-1] + window == length  # the last window ends exactly at the end
        assert all(s + window <= length for s in starts)  # no window hangs over the end
    else:
        assert starts == [0]  # one window the caller pads
    gaps = np.diff(starts)
    assert (gaps <= stride).all()


def test_sliding_windows_exact_values_and_bad_arguments():
    assert sliding_windows(10, 4, 2) == [0, 2, 4, 6]
    assert sliding_windows(11, 4, 4) == [0, 4, 7]
    with pytest.raises(ValueError):
        sliding_windows(10, 4, 5)  # would leave gaps
    with pytest.raises(ValueError):
        sliding_windows(0, 4, 2)


def test_crop_segments_threshold_and_clipping():
    segments = np.array([[0.0, 10.0], [8.0, 14.0], [18.0, 30.0], [40.0, 50.0], [10.0, 20.0]])
    kept, idx = crop_segments(segments, 10.0, 10.0, min_keep=0.5)  # crop [10, 20]
    # [0,10] touches only at 10 (overlap 0); [8,14] 4/6 kept; [18,30] 2/12 dropped; [10,20] whole
    assert idx.tolist() == [1, 4]
    np.testing.assert_allclose(kept, [[0.0, 4.0], [0.0, 10.0]])


def _truncate(seed, length=1000, window=100, segments=None, **kw):
    segments = np.array([[50.0, 70.0], [500.0, 560.0], [900.0, 990.0]]) if segments is None else segments
    return random_truncation(length, segments, window, np.random.default_rng(seed), **kw)


def test_random_truncation_keeps_segment_semantics():
    segments = np.array([[50.0, 70.0], [500.0, 560.0], [900.0, 990.0]])
    for seed in range(50):
        start, kept, idx = _truncate(seed, min_keep=0.5)
        assert 0 <= start <= 900 and isinstance(start, int)
        assert len(idx) >= 1  # an action-free crop was avoided
        assert ((kept >= 0) & (kept <= 100)).all() and (kept[:, 1] > kept[:, 0]).all()
        originals = segments[idx]
        # kept = original clipped to the crop, shifted to the crop start, at least half inside
        np.testing.assert_allclose(kept, np.clip(originals, start, start + 100) - start)
        assert ((kept[:, 1] - kept[:, 0]) >= 0.5 * (originals[:, 1] - originals[:, 0])).all()


def test_random_truncation_is_deterministic_given_rng():
    a, b = _truncate(7), _truncate(7)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
    starts = {_truncate(seed)[0] for seed in range(20)}
    assert len(starts) > 1


def test_random_truncation_short_sequence_and_no_possible_action():
    segments = np.array([[10.0, 30.0], [70.0, 85.0], [75.0, 99.0]])
    start, kept, idx = _truncate(0, length=80, window=100, segments=segments)
    assert start == 0 and idx.tolist() == [0, 1]  # [75, 99] has under half inside the real length
    np.testing.assert_allclose(kept, [[10.0, 30.0], [70.0, 80.0]])  # clipped to the real length
    # a segment longer than twice the window can never keep half of itself: best found, no loop forever
    start, kept, idx = _truncate(0, length=1000, window=100, segments=np.array([[0.0, 1000.0]]), max_tries=5)
    assert len(idx) == 0 and kept.shape == (0, 2)
    start, kept, idx = _truncate(0, segments=np.zeros((0, 2)))
    assert kept.shape == (0, 2) and idx.shape == (0,)

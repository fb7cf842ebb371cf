"""compress.history: the typed run record, its JSON, and histories written by the first releases.

tests/data/history_v1.json is a real history.json written by the landed code before the typed
history (the `blockdrop demo` compression of this repository's commit 17848e9, unedited).
tests/data/history_v2.json is a real history.json of format 2 written before selection strategies
(commit b26e374: `blockdrop compress` of a tiny 4-block detector by 2 blocks, mAP selection with
successive halving, first round 1 batch), unedited.
"""

import json
from pathlib import Path

import pytest

from blockdrop.compress.history import History, HistoryError
from blockdrop.recipes.report import render_report

V1 = Path(__file__).parent / "data" / "history_v1.json"
V2 = Path(__file__).parent / "data" / "history_v2.json"


def test_a_history_of_the_first_releases_loads_typed():
    raw = json.loads(V1.read_text())
    history = History.load(V1)
    assert history.metric == "average_mAP" and history.world_size == 1 and history.stopped == raw["stopped"]
    assert history.teacher.cost.gmacs == raw["teacher"]["gmacs"]
    assert history.teacher.cost.extra == {"backbone_gmacs": raw["teacher"]["backbone_gmacs"]}
    assert history.teacher.val["average_mAP"] == raw["teacher"]["val"]["average_mAP"]
    assert "per_class" not in history.teacher.val  # metrics only
    for step, old in zip(history.steps, raw["steps"]):
        assert step.dropped_original == old["dropped_original"] == step.selection.drop
        assert step.kept_blocks == old["kept_blocks"] and step.cost.latency_ms == old["latency_ms"]
        assert step.selection.scores == {int(k): v for k, v in old["selection"]["scores"].items()}
        assert step.align.epochs == old["align"]["history"] and step.align.val_before is None
    assert history.blocks_dropped == 2 and history.kept_blocks == raw["steps"][-1]["kept_blocks"]
    assert "2 of 6 blocks dropped" in render_report(history)


def test_the_json_round_trips(tmp_path):
    history = History.load(V1)
    history.save(tmp_path / "h.json")
    again = History.load(tmp_path / "h.json")
    assert again == history and json.loads((tmp_path / "h.json").read_text())["version"] == 2


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2], r"not a readable history .* re-run the compression with --overwrite"),
    (lambda text: json.dumps({**json.loads(text), "version": 9}), r"history format 9 is newer than this blockdrop reads"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "teacher"}),
     r"field 'teacher' or 'steps' missing"),
    (lambda text: text.replace('"gmacs"', '"gmacz"', 2), r"field 'teacher.cost.gmacs' is NoneType, expected float"),
    (lambda text: "[]", "expected a JSON object"),
])
def test_a_damaged_history_is_one_clear_error(tmp_path, damage, message):
    path = tmp_path / "history.json"
    path.write_text(damage(V1.read_text()))
    with pytest.raises(HistoryError, match=message) as err:
        History.load(path)
    assert str(err.value).startswith(str(path))


def test_a_history_written_before_selection_strategies_loads_as_the_papers():
    raw = json.loads(V2.read_text())
    history = History.load(V2)
    for step, old in zip(history.steps, raw["steps"]):
        sel = step.selection
        assert sel.strategy == "pre-recovery" and sel.trial is None and "strategy" not in old["selection"]
        assert sel.scores == {int(k): v for k, v in old["selection"]["scores"].items()}
        # the ranking is derived: the last halving round's candidates first, by score, then the rest
        finalists = sorted(sel.rounds[-1]["candidates"], key=lambda k: -sel.scores[k])
        assert sel.ranking[: len(finalists)] == finalists and sel.ranking[0] == sel.chosen_original
        assert sorted(sel.ranking) == sorted(sel.scores) and sel.order == sel.ranking
    assert "2 of 4 blocks dropped" in render_report(history)


def test_the_new_selection_records_round_trip(tmp_path):
    from blockdrop.compress.history import SelectionRecord, TrialRecord

    history = History.load(V2)
    trial = TrialRecord(shortlist=[3, 1, 2], batches=8, evaluator="map", metric="average_mAP", higher_is_better=True,
                        scores={3: 10.5, 1: 12.25, 2: float("nan")}, ranking=[1, 3, 2], block_forwards=321,
                        wall_time_s=4.5)
    history.steps[0].selection = SelectionRecord(
        "feature_cosine", None, False, {0: 0.4, 1: 0.2, 2: 0.3, 3: 0.1}, 1, 1, [1], block_forwards=400,
        wall_time_s=5.0, batches=3, strategy="recovery-aware", trial=trial)
    history.steps[1].selection = SelectionRecord("original_index", None, True, {0: 0.0, 2: 2.0, 3: 3.0}, 2, 3, [3],
                                                 strategy="truncate-last", ranking=[3, 2, 0])
    history.save(tmp_path / "history.json")
    again = History.load(tmp_path / "history.json")
    first, second = again.steps[0].selection, again.steps[1].selection
    assert first.ranking == [3, 1, 2, 0] and first.trial.ranking == [1, 3, 2] and first.order == [1, 3, 2, 0]
    assert first.trial.scores[1] == 12.25 and first.trial.scores[2] != first.trial.scores[2]  # NaN survives
    assert (first.trial.batches, first.trial.block_forwards, first.trial.wall_time_s) == (8, 321, 4.5)
    assert second.strategy == "truncate-last" and second.ranking == [3, 2, 0]
    assert again.to_json() == json.loads((tmp_path / "history.json").read_text())
    path = tmp_path / "selection.json"  # a step's own record, as resume reads it
    path.write_text(json.dumps(History.selection_to_json(first)))
    step_file = History.selection_from_json(json.loads(path.read_text()), str(path))
    assert step_file.order == first.order and step_file.trial.shortlist == [3, 1, 2]
    assert step_file.trial.scores[3] == 10.5 and step_file.strategy == "recovery-aware"


def test_a_damaged_trial_record_names_its_field(tmp_path):
    data = json.loads(V2.read_text())
    data["steps"][0]["selection"].update(strategy="recovery-aware", trial={"shortlist": [1, "x"], "batches": 8})
    path = tmp_path / "history.json"
    path.write_text(json.dumps(data))
    with pytest.raises(HistoryError, match=r"field 'steps\[0\]\.selection\.trial\.shortlist' is not a list of block"):
        History.load(path)

"""compress.history: the typed run record, its JSON, and histories written by the first releases.

tests/data/history_v1.json is a real history.json written by the landed code before the typed
history (the `blockdrop demo` compression of this repository's commit 17848e9, unedited).
"""

import json
from pathlib import Path

import pytest

from blockdrop.compress.history import History, HistoryError
from blockdrop.recipes.report import render_report

V1 = Path(__file__).parent / "data" / "history_v1.json"


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

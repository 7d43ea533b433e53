"""Partner data: reading and validating `text,label` files, partitioning, and the demo corpus.

Bad input fails early, with the file, the row (1-based data rows, header not counted) and
the problem in the message, before any training or privacy budget is spent.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Self

import numpy as np

from confide.errors import ConfideError

SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".parquet")
TEXT = "text"
LABEL = "label"


class DataError(ConfideError, ValueError):
    """A data file or partition cannot be used; the message names file, row and problem."""


@dataclass
class TextDataset:
    """Texts with integer labels (and optional extra columns, e.g. a domain)."""

    texts: list[str]
    labels: np.ndarray
    source: str = "<memory>"
    columns: dict[str, list[str]] = field(default_factory=dict)
    synthetic: bool = False

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray, source: str | None = None
               ) -> Self:
        idx = [int(i) for i in indices]
        # replace(): a subclass (e.g. prompts with completions) keeps its type and fields
        return replace(
            self, texts=[self.texts[i] for i in idx], labels=self.labels[idx].copy(),
            source=source or self.source,
            columns={k: [v[i] for i in idx] for k, v in self.columns.items()})

    @property
    def num_labels(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0


# -- reading ------------------------------------------------------------------------------

def read_text_file(path: str | Path, *, num_labels: int = 0, max_rows: int = 0) -> TextDataset:
    """Read and validate one CSV, JSONL or Parquet file with `text` and `label` columns."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; "
                        f"allowed: {', '.join(SUPPORTED_SUFFIXES)}")
    try:
        if suffix == ".csv":
            rows = _read_csv(path, max_rows)
        elif suffix == ".jsonl":
            rows = _read_jsonl(path, max_rows)
        else:
            rows = _read_parquet(path, max_rows)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 text (byte offset {exc.start}): "
                        f"{exc.reason}") from None
    except PermissionError:
        raise DataError(f"{path}: cannot be read (permission denied)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read: {exc}") from None
    return _validate_rows(path, rows, num_labels)


# One text field may be long (a whole document); the csv module's default limit is 128 KiB.
CSV_FIELD_LIMIT = 64 * 1024 * 1024


def _read_csv(path: Path, max_rows: int) -> list[dict[str, object]]:
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, not part of the header
    with path.open(newline="", encoding="utf-8-sig") as fh:
        try:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                raise DataError(f"{path}: empty file (no header, no rows)")
            _check_columns(path, reader.fieldnames)
            rows: list[dict[str, object]] = []
            for row in reader:
                if None in row:  # more fields than the header has
                    raise DataError(f"{path}: row {len(rows) + 1}: more fields than the "
                                    f"header ({len(reader.fieldnames)} columns)")
                rows.append(dict(row))
                if max_rows and len(rows) >= max_rows:
                    break
        except csv.Error as exc:
            raise DataError(f"{path}: row {len(rows) + 1}: malformed CSV: {exc}") from None
    return rows


def _read_jsonl(path: Path, max_rows: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    with path.open(encoding="utf-8-sig") as fh:  # a leading byte-order mark is dropped
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {lineno}: not valid JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: row {lineno}: expected a JSON object, "
                                f"got {type(obj).__name__}")
            _check_columns(path, list(obj), row=lineno)
            rows.append(obj)
            if max_rows and len(rows) >= max_rows:
                break
    return rows


def _read_parquet(path: Path, max_rows: int) -> list[dict[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    _check_columns(path, table.column_names)
    if max_rows:
        table = table.slice(0, max_rows)
    return table.to_pylist()


def _check_columns(path: Path, columns: Sequence[str], row: int | None = None) -> None:
    missing = [c for c in (TEXT, LABEL) if c not in columns]
    if missing:
        where = f"row {row}: " if row else ""
        raise DataError(f"{path}: {where}missing column(s) {', '.join(missing)}; "
                        f"found: {', '.join(map(str, columns)) or 'none'}")


def _validate_rows(path: Path, rows: list[dict[str, object]], num_labels: int) -> TextDataset:
    if not rows:
        raise DataError(f"{path}: no data rows")
    texts: list[str] = []
    labels = np.empty(len(rows), dtype=np.int64)
    extra_keys = [k for k in rows[0] if k not in (TEXT, LABEL)]
    columns: dict[str, list[str]] = {k: [] for k in extra_keys}
    for i, row in enumerate(rows, start=1):
        text = row.get(TEXT)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: row {i}: text is empty or not a string")
        labels[i - 1] = _parse_label(path, i, row.get(LABEL), num_labels)
        texts.append(text)
        for k in extra_keys:
            columns[k].append("" if row.get(k) is None else str(row.get(k)))
    return TextDataset(texts=texts, labels=labels, source=str(path), columns=columns)


def _parse_label(path: Path, row: int, value: object, num_labels: int) -> int:
    # a Parquet (or pandas) NaN reads as None or float nan: say what the file holds
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{path}: row {row}: label is NaN (missing); every row needs an "
                        "integer label")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{path}: row {row}: label is empty; every row needs an integer label")
    if isinstance(value, bool):
        raise DataError(f"{path}: row {row}: label {value!r} is not an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise DataError(f"{path}: row {row}: label {value!r} is not an integer")
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise DataError(f"{path}: row {row}: label {value!r} is not an integer") from None
    if not isinstance(value, int):
        raise DataError(f"{path}: row {row}: label {value!r} is not an integer")
    if value < 0 or (num_labels and value >= num_labels):
        allowed = f"0..{num_labels - 1}" if num_labels else ">= 0"
        raise DataError(f"{path}: row {row}: label {value} is out of range; allowed: {allowed}")
    return value


# (path, num_labels=, max_rows=) -> dataset: read_text_file, or a task's own reader
Reader = Callable[..., TextDataset]


def read_partner_folder(folder: str | Path, *, num_labels: int = 0, max_rows: int = 0,
                        reader: Reader | None = None) -> list[TextDataset]:
    """One file per partner, in file-name order."""
    read = reader or read_text_file
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no {'/'.join(SUPPORTED_SUFFIXES)} files for partners")
    return [read(f, num_labels=num_labels, max_rows=max_rows) for f in files]


# -- partitioning -------------------------------------------------------------------------

def partition(data: TextDataset, num_partitions: int, method: str, *, seed: int,
              alpha: float = 1.0, column: str = "domain") -> list[TextDataset]:
    """Split one dataset among partners. Every partition must be non-empty."""
    if num_partitions < 1:
        raise DataError(f"cannot split into {num_partitions} partitions")
    if len(data) < num_partitions:
        raise DataError(f"{data.source}: {len(data)} rows cannot be split among "
                        f"{num_partitions} partners (every partner needs at least one row)")
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = np.array_split(rng.permutation(len(data)), num_partitions)
    elif method == "dirichlet":
        parts = _dirichlet_split(data.labels, num_partitions, alpha, rng)
    elif method == "column":
        parts = _column_split(data, num_partitions, column)
    else:
        raise DataError(f"partitioner = {method!r}; allowed: iid, dirichlet, column")
    out = []
    for i, idx in enumerate(parts):
        if len(idx) == 0:
            raise DataError(f"{data.source}: partition {i} of {num_partitions} "
                            f"({method}) is empty")
        out.append(data.subset(np.sort(idx), source=f"{data.source}#partition{i}"))
    return out


def _dirichlet_split(labels: np.ndarray, n: int, alpha: float, rng: np.random.Generator,
                     min_size: int = 2, max_tries: int = 100) -> list[np.ndarray]:
    """Per-class proportions from Dir(alpha) (Hsu et al. 2019); resample until no partner
    has fewer than `min_size` rows (alpha near 0 would otherwise leave partners empty)."""
    classes = np.unique(labels)
    for _ in range(max_tries):
        buckets: list[list[int]] = [[] for _ in range(n)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for b, chunk in zip(buckets, np.split(idx, cuts), strict=True):
                b.extend(chunk.tolist())
        if min(len(b) for b in buckets) >= min(min_size, len(labels) // n):
            return [np.asarray(b, dtype=np.int64) for b in buckets]
    raise DataError(f"dirichlet partitioner: could not give each of {n} partners at least "
                    f"{min_size} rows with alpha={alpha} in {max_tries} tries; "
                    "raise dirichlet-alpha or use fewer clients")


def _column_split(data: TextDataset, n: int, column: str) -> list[np.ndarray]:
    if column not in data.columns:
        raise DataError(f"{data.source}: partition-column {column!r} not found; "
                        f"columns: {', '.join([TEXT, LABEL, *data.columns])}")
    values = data.columns[column]
    groups = sorted(set(values))
    if len(groups) != n:
        raise DataError(f"{data.source}: column {column!r} has {len(groups)} distinct values "
                        f"({', '.join(groups[:8])}) but clients = {n}; they must match")
    return [np.flatnonzero(np.asarray(values) == g) for g in groups]


# -- synthetic demo corpus ----------------------------------------------------------------

_POS = ["wonderful", "excellent", "delightful", "brilliant", "moving", "charming", "superb",
        "heartfelt", "gripping", "beautiful", "clever", "memorable"]
_NEG = ["dreadful", "boring", "tedious", "awful", "clumsy", "dull", "lifeless", "terrible",
        "pointless", "messy", "forgettable", "painful"]
_SUBJ = ["the film", "this movie", "the plot", "the acting", "the soundtrack", "the script",
         "the ending", "the direction", "the cast", "the story"]
_TAIL = ["overall", "from start to finish", "in every scene", "by the end", "if you ask me",
         "for most of its running time", "despite the hype", "as expected"]
_NEUTRAL = ["is", "felt", "seemed", "was", "turned out"]


def synthetic_sentiment(num_rows: int = 800, seed: int = 0) -> TextDataset:
    """A small offline demo corpus: template movie reviews with binary sentiment.

    SYNTHETIC: generated from word lists, not real reviews. Every report that shows it says
    so; it exists only so that the out-of-the-box demo runs without any download.
    The first SYNTHETIC_EXACT_ROWS rows are drawn one by one (the corpus of every earlier
    version); rows beyond them (many partners: 400 per partner) are drawn in bulk from a
    generator derived from the seed, so that 1,000 partners' 400,000 rows take about a
    second instead of minutes.
    """
    rng = np.random.default_rng(seed)
    integers, random, choice = rng.integers, rng.random, rng.choice
    texts, labels = [], []
    for _ in range(min(num_rows, SYNTHETIC_EXACT_ROWS)):
        label = int(integers(2))
        words = _POS if label else _NEG
        other = _NEG if label else _POS
        first, second = choice(len(words), size=2, replace=False)
        parts = [_SUBJ[integers(0, len(_SUBJ))], _NEUTRAL[integers(0, len(_NEUTRAL))],
                 words[first]]
        if random() < 0.5:
            parts += ["and", words[second]]
        if random() < 0.25:  # a contrary word so the task is not trivially separable
            parts += [", though a little", other[integers(0, len(other))]]
        parts.append(_TAIL[integers(0, len(_TAIL))])
        texts.append(" ".join(parts))
        labels.append(label)
    if num_rows > SYNTHETIC_EXACT_ROWS:
        more_texts, more_labels = _synthetic_bulk(num_rows - SYNTHETIC_EXACT_ROWS, seed)
        texts += more_texts
        labels += more_labels
    return TextDataset(texts=texts, labels=np.asarray(labels, dtype=np.int64),
                       source="synthetic-demo (generated, not real data)", synthetic=True)


SYNTHETIC_EXACT_ROWS = 2000


def _synthetic_bulk(num_rows: int, seed: int) -> tuple[list[str], list[int]]:
    """The same templates and proportions as synthetic_sentiment, drawn in bulk."""
    rng = np.random.default_rng([seed, 1])
    n = len(_POS)
    label = rng.integers(2, size=num_rows)
    first = rng.integers(0, n, size=num_rows)
    second = (first + rng.integers(1, n, size=num_rows)) % n  # distinct from first
    subj = rng.integers(0, len(_SUBJ), size=num_rows)
    verb = rng.integers(0, len(_NEUTRAL), size=num_rows)
    more = rng.random(num_rows) < 0.5
    contrary = rng.random(num_rows) < 0.25
    opposite = rng.integers(0, n, size=num_rows)
    tail = rng.integers(0, len(_TAIL), size=num_rows)
    texts = []
    for i in range(num_rows):
        words, other = (_POS, _NEG) if label[i] else (_NEG, _POS)
        parts = [_SUBJ[subj[i]], _NEUTRAL[verb[i]], words[first[i]]]
        if more[i]:
            parts += ["and", words[second[i]]]
        if contrary[i]:
            parts += [", though a little", other[opposite[i]]]
        parts.append(_TAIL[tail[i]])
        texts.append(" ".join(parts))
    return texts, [int(x) for x in label]


# -- assembling a simulation's data -------------------------------------------------------

@dataclass
class FederatedData:
    partitions: list[TextDataset]
    evaluation: TextDataset
    num_labels: int
    synthetic: bool
    # how num-labels was set, and when inferred: from which labels and rows (for the log);
    # empty for a task whose rows have no classes (causal-lm)
    labels_note: str = ""


def load_federated_data(*, data: str, eval_data: str, clients: int, partitioner: str,
                        seed: int, alpha: float, column: str, num_labels: int,
                        max_train: int = 0, max_eval: int = 0,
                        reader: Reader | None = None) -> FederatedData:
    """Training partitions for `clients` partners and a central evaluation set (files read
    by `reader`, default `read_text_file`: a task may bring its own)."""
    read = reader or read_text_file
    synthetic = not data
    whole: list[TextDataset] = []  # files as read (row numbers intact), for the labels note
    eval_file: TextDataset | None = None  # the eval-data file as read, when one is given
    if synthetic and reader is not None:
        raise DataError("this task has no synthetic demo corpus: give data (and eval-data)")
    if synthetic:
        full = synthetic_sentiment(max(2000, 400 * clients), seed=seed)
        held = max(300, len(full) // 6)
        evaluation = full.subset(range(held), source=full.source + " [eval]")
        train = full.subset(range(held, len(full)))
        parts = partition(train, clients, "iid" if partitioner == "column" else partitioner,
                          seed=seed, alpha=alpha, column=column)
    else:
        path = Path(data)
        if path.is_dir():
            parts = read_partner_folder(path, num_labels=num_labels, max_rows=max_train,
                                        reader=reader)
            whole += parts
            if len(parts) != clients:
                raise DataError(f"{path}: holds {len(parts)} partner files but clients = "
                                f"{clients}; they must match")
            if not eval_data:
                raise DataError(f"{path}: a folder of partner files needs eval-data (a "
                                "separate evaluation file; partners' rows stay theirs)")
        else:
            train = read(path, num_labels=num_labels, max_rows=max_train)
            whole.append(train)
            if not eval_data:
                # No evaluation file: hold out a seeded 20% (at most 2000 rows) of this file
                # before partitioning, so evaluation never sees a training row.
                order = np.random.default_rng(seed + 1).permutation(len(train))
                held = min(2000, max(1, len(train) // 5))
                evaluation = train.subset(np.sort(order[:held]),
                                          source=f"{path} [held-out {held} rows]")
                train = train.subset(np.sort(order[held:]))
            parts = partition(train, clients, partitioner, seed=seed, alpha=alpha,
                              column=column)
        if eval_data:
            evaluation = eval_file = read(eval_data, num_labels=num_labels, max_rows=max_eval)
            whole.append(evaluation)
    if max_eval and len(evaluation) > max_eval:
        evaluation = evaluation.subset(range(max_eval))
    inferred = max(max(p.num_labels for p in parts), evaluation.num_labels)
    labels = num_labels or max(2, inferred)
    if inferred > labels:
        raise DataError(f"labels go up to {inferred - 1} but num-labels = {labels}")
    if reader is not None:  # a task's own reader (causal-lm): its rows have no classes
        note = ""
    else:
        note = f"num-labels = {labels} (set)" if num_labels else _inferred_labels_note(whole)
    if not num_labels and not synthetic and reader is None:  # after the gap check's message
        _check_inferred_classes([f for f in whole if f is not eval_file], eval_file)
    return FederatedData(parts, evaluation, labels, synthetic, note)


def check_delta(delta: float, partitions: Sequence[TextDataset], *, allow_large: bool
                ) -> None:
    """delta >= 1/n for a partner of n rows is no privacy guarantee: publishing one of its
    records outright meets (epsilon, 1/n)-DP. Refused unless allow-large-delta is set."""
    if allow_large or not partitions:
        return
    smallest = min(partitions, key=len)
    if delta >= 1.0 / max(len(smallest), 1):
        raise DataError(
            f"delta = {delta:g} is >= 1/(rows of the smallest partner) = 1/{len(smallest)} "
            f"({smallest.source}): a guarantee at this delta is met by publishing one of its "
            f"records outright. Choose delta well below {1.0 / len(smallest):.3g} (e.g. "
            "1/(10 x rows) or less; the default is 1e-05), or set allow-large-delta = true "
            "to accept it (every statement of the guarantee then says so; partners' nodes "
            "apply their own max-delta)")


# A class with fewer training rows than this, while num-labels is inferred, is taken for a
# typo (a lone `2` in a 0/1 file), not a class: it would silently add an output class.
RARE_LABEL_ROWS = 5


def _rows_of(files: Sequence[TextDataset], label: int, limit: int = 5) -> str:
    """'file row 3, 17; other row 2' for the rows of `label` (at most `limit` per file)."""
    return "; ".join(
        f"{f.source} row "
        f"{', '.join(str(int(i) + 1) for i in np.flatnonzero(f.labels == label)[:limit])}"
        for f in files if (f.labels == label).any())


def _check_inferred_classes(train: Sequence[TextDataset], evaluation: TextDataset | None
                            ) -> None:
    """num-labels inferred: every class must be a real one of the training data. A label
    with fewer than RARE_LABEL_ROWS training rows, or one that only the evaluation file
    holds, is an error naming its rows (set num-labels to mean it)."""
    counts: dict[int, int] = {}
    for f in train:
        for label, n in zip(*np.unique(f.labels, return_counts=True), strict=True):
            counts[int(label)] = counts.get(int(label), 0) + int(n)
    hint = "fix the row(s), or set num-labels explicitly if the class is meant"
    for label, n in sorted(counts.items()):
        if n < RARE_LABEL_ROWS and len(counts) > 1:
            raise DataError(
                f"label {label} occurs in only {n} training row(s) ({_rows_of(train, label)}), "
                f"fewer than {RARE_LABEL_ROWS}: with num-labels inferred it would add a class "
                f"of its own; {hint}")
    if evaluation is not None:
        only_eval = sorted(set(np.unique(evaluation.labels).tolist()) - set(counts))
        if only_eval:
            label = int(only_eval[0])
            raise DataError(
                f"label {label} occurs only in eval-data ({_rows_of([evaluation], label)}), "
                f"never in the training data: with num-labels inferred it would add a class "
                f"no partner can learn; {hint}")


def _inferred_labels_note(files: Sequence[TextDataset]) -> str:
    """num-labels is inferred as highest label + 1: say from which rows, and refuse labels
    with a gap (0, 1 and a lone 5 is a typo far more often than a 6-class task)."""
    files = [f for f in files if len(f.labels)]
    if not files:
        return ""
    present = sorted(set().union(*(set(np.unique(f.labels).tolist()) for f in files)))
    top = int(present[-1])
    where = "; ".join(
        f"{f.source} row {', '.join(str(int(i) + 1) for i in np.flatnonzero(f.labels == top)[:5])}"
        for f in files if (f.labels == top).any())
    missing = sorted(set(range(top + 1)) - set(present))
    if missing:
        raise DataError(f"num-labels would be inferred as {top + 1} from label {top} ({where}), "
                        f"but label(s) {', '.join(map(str, missing))} never occur: a typo in a "
                        f"label? Fix the row, or set num-labels = {top + 1} if {top + 1} "
                        "classes are meant")
    return (f"num-labels = {max(2, top + 1)} inferred from the data (labels "
            f"{', '.join(map(str, present))}; the highest, {top}, in {where})")

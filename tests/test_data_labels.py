"""Classes that cannot appear by accident: with num-labels inferred, a label with only a few
training rows (a lone `2` in a 0/1 file) or one only the evaluation file holds is an error
naming its rows; a Parquet NaN label is called NaN; delta at or above 1/(rows of the
smallest partner) is refused unless allow-large-delta is set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from confide.data import (
    RARE_LABEL_ROWS,
    DataError,
    TextDataset,
    check_delta,
    load_federated_data,
    read_text_file,
)


def federated(path: Path, eval_path: Path | None = None, num_labels: int = 0):
    return load_federated_data(data=str(path), eval_data=str(eval_path or ""), clients=2,
                               partitioner="iid", seed=0, alpha=1.0, column="",
                               num_labels=num_labels)


def csv(path: Path, labels: list[int]) -> Path:
    path.write_text("text,label\n" + "".join(f"review number {i},{y}\n"
                                             for i, y in enumerate(labels)))
    return path


def test_one_row_of_a_third_label_is_named_not_a_three_class_model(tmp_path: Path) -> None:
    labels = [i % 2 for i in range(40)]
    labels[17] = 2
    path = csv(tmp_path / "train.csv", labels)
    with pytest.raises(DataError, match="label 2 occurs in only 1 training row") as err:
        federated(path)
    assert f"{path} row 18" in str(err.value) and "set num-labels" in str(err.value)
    assert federated(path, num_labels=3).num_labels == 3  # said explicitly, it is meant


def test_a_class_with_enough_rows_is_a_class(tmp_path: Path) -> None:
    labels = [i % 2 for i in range(40)] + [2] * RARE_LABEL_ROWS
    assert federated(csv(tmp_path / "train.csv", labels)).num_labels == 3


def test_a_label_only_in_eval_data_is_named(tmp_path: Path) -> None:
    train = csv(tmp_path / "train.csv", [i % 2 for i in range(40)])
    evaluation = csv(tmp_path / "eval.csv", [0, 1, 0, 2, 1])
    with pytest.raises(DataError, match="label 2 occurs only in eval-data") as err:
        federated(train, evaluation)
    assert f"{evaluation} row 4" in str(err.value)
    assert federated(train, evaluation, num_labels=3).num_labels == 3


def test_a_parquet_nan_label_is_called_nan(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [0.0, float("nan"), 1.0]}),
                   path)
    with pytest.raises(DataError, match=r"row 2: label is NaN \(missing\)"):
        read_text_file(path)
    pq.write_table(pa.table({"text": ["a", "b"], "label": pa.array([1, None],
                                                                    pa.int64())}), path)
    with pytest.raises(DataError, match=r"row 2: label is NaN \(missing\)"):
        read_text_file(path)


def partner(rows: int, name: str) -> TextDataset:
    return TextDataset([f"t{i}" for i in range(rows)], np.zeros(rows, dtype=np.int64), name)


def test_delta_at_or_above_one_over_the_smallest_partner_is_refused() -> None:
    parts = [partner(1000, "big"), partner(100, "small")]
    with pytest.raises(DataError, match=r"delta = 0.5 is >= 1/\(rows of the smallest "
                                        r"partner\) = 1/100 \(small\)") as err:
        check_delta(0.5, parts, allow_large=False)
    assert "allow-large-delta = true" in str(err.value)
    with pytest.raises(DataError):
        check_delta(0.01, parts, allow_large=False)  # exactly 1/n
    check_delta(0.009, parts, allow_large=False)
    check_delta(0.5, parts, allow_large=True)  # the override, said in every guarantee line

import json
from pathlib import Path

import numpy as np
import pytest

from confide.data import (
    DataError,
    load_federated_data,
    partition,
    read_partner_folder,
    read_text_file,
    synthetic_sentiment,
)


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_reads_csv_jsonl_parquet_identically(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "good film", "label": 1}, {"text": "bad, sad", "label": 0}]
    write(tmp_path / "a.csv", 'text,label\ngood film,1\n"bad, sad",0\n')
    write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for suffix in ("csv", "jsonl", "parquet"):
        d = read_text_file(tmp_path / f"a.{suffix}")
        assert d.texts == ["good film", "bad, sad"]
        assert d.labels.tolist() == [1, 0]


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("missing.csv", "text,score\nhi,1\n", "missing column(s) label"),
    ("empty.csv", "", "empty file"),
    ("header_only.csv", "text,label\n", "no data rows"),
    ("float_label.csv", "text,label\nhi,1\nho,1.5\n", "row 2: label '1.5' is not an integer"),
    ("word_label.csv", "text,label\nhi,pos\n", "row 1: label 'pos' is not an integer"),
    ("neg_label.csv", "text,label\nhi,-1\n", "row 1: label -1 is out of range"),
    ("empty_text.csv", "text,label\nhi,1\n,0\n", "row 2: text is empty"),
    ("extra_field.csv", "text,label\nhi,1,zzz\n", "row 1: more fields than the header"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", \n', "row 2: not valid JSON"),
    ("list.jsonl", '[1, 2]\n', "row 1: expected a JSON object"),
    ("table.txt", "text,label\n", "unsupported file type '.txt'"),
])
def test_malformed_files_fail_naming_file_row_problem(tmp_path: Path, name: str, content: str,
                                                     needle: str) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as info:
        read_text_file(path)
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_bad_encoding_and_unreadable_and_out_of_range(tmp_path: Path) -> None:
    path = write(tmp_path / "latin1.csv", "text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_text_file(path)
    with pytest.raises(DataError, match="does not exist"):
        read_text_file(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="not a readable Parquet"):
        read_text_file(write(tmp_path / "x.parquet", b"garbage"))
    path = write(tmp_path / "three.csv", "text,label\na,0\nb,2\n")
    with pytest.raises(DataError, match=r"row 2: label 2 is out of range; allowed: 0..1"):
        read_text_file(path, num_labels=2)


def test_iid_partitions_are_disjoint_complete_and_seeded() -> None:
    data = synthetic_sentiment(203, seed=1)
    parts = partition(data, 4, "iid", seed=3)
    texts = [t for p in parts for t in p.texts]
    assert sorted(texts) == sorted(data.texts)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    again = partition(data, 4, "iid", seed=3)
    assert [p.texts for p in parts] == [p.texts for p in again]


def test_dirichlet_skews_labels_more_with_small_alpha() -> None:
    data = synthetic_sentiment(2000, seed=2)

    def skew(alpha: float) -> float:
        parts = partition(data, 5, "dirichlet", seed=0, alpha=alpha)
        assert sum(len(p) for p in parts) == len(data)
        return float(np.mean([abs(p.labels.mean() - 0.5) for p in parts]))

    assert skew(0.1) > skew(100.0) + 0.1


def test_column_partitioner_and_empty_partition_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "text,label,domain\na,0,x\nb,1,y\nc,1,x\n")
    data = read_text_file(path)
    parts = partition(data, 2, "column", seed=0, column="domain")
    assert [p.texts for p in parts] == [["a", "c"], ["b"]]
    with pytest.raises(DataError, match=r"has 2 distinct values .* but clients = 3"):
        partition(data, 3, "column", seed=0, column="domain")
    with pytest.raises(DataError, match="partition-column 'site' not found"):
        partition(data, 2, "column", seed=0, column="site")
    with pytest.raises(DataError, match="3 rows cannot be split among 4 partners"):
        partition(data, 4, "iid", seed=0)


def test_partner_folder_and_federated_loading(tmp_path: Path) -> None:
    for i in range(3):
        write(tmp_path / f"partner{i}.csv", f"text,label\nrow {i},1\nother {i},0\n")
    parts = read_partner_folder(tmp_path)
    assert [p.texts[0] for p in parts] == ["row 0", "row 1", "row 2"]
    with pytest.raises(DataError, match="needs eval-data"):
        load_federated_data(data=str(tmp_path), eval_data="", clients=3, partitioner="iid",
                            seed=0, alpha=1, column="d", num_labels=0)
    with pytest.raises(DataError, match="holds 3 partner files but clients = 2"):
        load_federated_data(data=str(tmp_path), eval_data=str(tmp_path / "partner0.csv"),
                            clients=2, partitioner="iid", seed=0, alpha=1, column="d",
                            num_labels=0)


def test_synthetic_demo_is_labelled_synthetic_and_balanced() -> None:
    fed = load_federated_data(data="", eval_data="", clients=4, partitioner="iid", seed=0,
                              alpha=1.0, column="domain", num_labels=0)
    assert fed.synthetic and fed.evaluation.synthetic
    assert "synthetic" in fed.evaluation.source
    assert fed.num_labels == 2
    assert 0.4 < fed.evaluation.labels.mean() < 0.6
    eval_texts = set(fed.evaluation.texts)
    assert all(len(p) > 0 for p in fed.partitions)
    assert len(eval_texts) > 0


def test_real_sst2_dev_loads(sst2_dev: Path) -> None:
    data = read_text_file(sst2_dev, num_labels=2)
    assert len(data) == 872
    assert np.bincount(data.labels).tolist() == [428, 444]


def test_real_amazon_domains_by_blocks(amazon_dev: Path) -> None:
    data = read_text_file(amazon_dev)
    parts = partition(data, 4, "iid", seed=0)
    assert sum(len(p) for p in parts) == 1200


def test_single_file_without_eval_data_holds_out_rows(tmp_path: Path) -> None:
    rows = "".join(f"row {i},{i % 2}\n" for i in range(50))
    path = write(tmp_path / "d.csv", "text,label\n" + rows)
    fed = load_federated_data(data=str(path), eval_data="", clients=2, partitioner="iid",
                              seed=0, alpha=1.0, column="d", num_labels=0)
    train = {t for p in fed.partitions for t in p.texts}
    assert len(fed.evaluation) == 10 and len(train) == 40
    assert not train & set(fed.evaluation.texts), "evaluation must never see a training row"
    assert "held-out" in fed.evaluation.source

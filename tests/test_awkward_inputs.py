"""Awkward inputs (a byte-order mark, a stray label, a huge text field, a flag and `--set`
disagreeing, a model folder without weights, `--out` naming a file, a report on a folder
that is no run) that used to be silently wrong or a traceback, each reproduced and given
its clear outcome (all in process, no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from confide.cli import main
from confide.data import DataError, load_federated_data, read_text_file


def federated(path: Path, num_labels: int = 0):
    return load_federated_data(data=str(path), eval_data="", clients=2, partitioner="iid",
                               seed=0, alpha=1.0, column="", num_labels=num_labels)


def rows(n: int, label=lambda i: i % 2) -> str:
    return "".join(f"review number {i},{label(i)}\n" for i in range(n))


def test_csv_with_a_byte_order_mark_reads(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\n" + rows(4).encode())  # Excel "CSV UTF-8"
    data = read_text_file(path)
    assert len(data) == 4 and data.texts[0] == "review number 0"


def test_a_stray_label_in_a_binary_file_is_named_with_its_row(tmp_path: Path) -> None:
    path = tmp_path / "typo.csv"
    path.write_text("text,label\n" + rows(20, lambda i: 5 if i == 6 else i % 2))
    with pytest.raises(DataError, match=r"label\(s\) 2, 3, 4 never occur") as err:
        federated(path)
    assert f"{path} row 7" in str(err.value) and "num-labels = 6" in str(err.value)
    # said explicitly, six classes are allowed
    assert federated(path, num_labels=6).num_labels == 6


def test_inferred_label_count_is_stated_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "ok.csv"
    path.write_text("text,label\n" + rows(20))
    fed = federated(path)
    assert fed.num_labels == 2
    assert fed.labels_note.startswith("num-labels = 2 inferred from the data (labels 0, 1")
    assert f"{path} row 2" in fed.labels_note


def test_a_one_megabyte_text_field_reads(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_text("text,label\n" + "x" * (1 << 20) + ",1\nshort,0\n")
    data = read_text_file(path)
    assert len(data.texts[0]) == 1 << 20


@pytest.mark.parametrize("argv", [
    ["--target-epsilon", "3", "--set", "target-epsilon=8"],
    ["--max-epsilon", "4", "--set", "max-epsilon=9"],
    ["--no-example-dp", "--set", "example-dp=true"],
])
def test_a_named_flag_and_set_disagreeing_is_an_error(
        argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--model", "tiny", *argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "given twice with different values" in err
    assert not (tmp_path / "r").exists()


def test_model_folder_with_only_config_json_is_a_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "bert"}')
    assert main(["simulate", "--model", str(tmp_path / "m"), "--out",
                 str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "has config.json but no weights" in err and "Traceback" not in err


def test_out_naming_an_existing_file_is_a_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["simulate", "--model", "tiny", "--out", str(target)]) == 2
    assert "is an existing file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_audit_report_on_a_folder_that_is_not_a_run_fails(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "report", str(tmp_path)]) == 2
    assert "is not a Confide run folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

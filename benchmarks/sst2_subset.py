"""The seeded SST-2 training subset every SST-2 benchmark uses, so their rows are the same.

The first `rows` of a seeded permutation of ../shared/data/sst2/train.csv, kept in file
order; dev.csv (872 rows) is the evaluation set. Imported by the benchmark scripts (run as
`python benchmarks/<script>.py`, which puts this folder on the path).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from confide.data import TextDataset, read_text_file

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def subset(rows: int, seed: int) -> TextDataset:
    data = read_text_file(SST2 / "train.csv", num_labels=2)
    idx = np.random.default_rng(seed).permutation(len(data))[:rows]
    return data.subset(sorted(idx.tolist()))


def write_subset(rows: int, seed: int, out: Path) -> Path:
    """`subset` as a text,label CSV at `out` (for runs of the real app)."""
    data = subset(rows, seed)
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for text, label in zip(data.texts, data.labels, strict=True):
            w.writerow([text, int(label)])
    return out

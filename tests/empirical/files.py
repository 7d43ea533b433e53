"""Data files the empirical-audit tests train on."""

from __future__ import annotations

import csv
from pathlib import Path

from confide.data import synthetic_sentiment


def write_sentiment_csv(path: Path, n: int, seed: int) -> Path:
    """`n` synthetic text,label rows (the offline demo corpus) as a CSV file."""
    data = synthetic_sentiment(n, seed=seed)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(zip(data.texts, data.labels.tolist(), strict=True))
    return path

"""Shared fixtures: paths to the real data in ../shared (skip with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} is absent (../shared/data beside the checkout); "
                    "CI has it")
    return path


@pytest.fixture
def sst2_dev() -> Path:
    return shared_file("sst2", "dev.csv")


@pytest.fixture
def amazon_dev() -> Path:
    return shared_file("amazon_multidomain", "dev.csv")

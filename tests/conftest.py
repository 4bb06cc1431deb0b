from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from runtime import MemoryStore, Pricing, Runtime

from .fakes import FakeModel

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def rt(tmp_path: Path, model: FakeModel, store: MemoryStore) -> AsyncIterator[Runtime]:
    """A runtime on the fake model (use with ``autojump_clock`` for timing)."""
    async with Runtime.open(
        data_dir=tmp_path,
        model=model,
        store=store,
        prices={"fake": Pricing(1_000_000.0, 2_000_000.0)},  # 1 credit/input token, 2/output
    ) as runtime:
        yield runtime

"""Session-scoped tiny NF4 base model, its BaseModelSpec, and a factory of random PEFT LoRA adapters for it."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from server.adapters.types import BaseModelSpec
from tests.tiny import TINY_NAME, load_nf4, make_adapter, save_tiny_base

MAX_RANK = 16


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """Directory of the float32 tiny Llama (its basename matches ``TINY_NAME``'s)."""
    return save_tiny_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="session")
def spec(base_dir) -> BaseModelSpec:
    """The spec of the tiny base loaded in NF4 (double quant, bf16 compute), ``max_rank`` 16."""
    return BaseModelSpec.from_model(load_nf4(base_dir), TINY_NAME, MAX_RANK)


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def adapter(base_dir, adapters_dir):
    """``adapter(seed=0, **lora_kwargs) -> Path``: a fresh random PEFT adapter directory (see ``tests.tiny``)."""
    counter = itertools.count()

    def build(seed: int = 0, **kwargs) -> Path:
        return make_adapter(base_dir, adapters_dir / f"a{next(counter)}", seed=seed, **kwargs)

    return build

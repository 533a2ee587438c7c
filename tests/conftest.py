"""Shared fixtures: real MNIST (copied, never unpacked in place), a prepared canonical file, a tiny trained run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def mnist_raw_source() -> Path:
    """The folder holding the four original MNIST .gz files (read-only is fine: nothing is written there).

    $DIFFUSION_DATA_SOURCE names it; without it the files are downloaded once into .cache/ (needs internet).
    """
    from diffusion_core.data import fetch_raw, get_spec

    if os.environ.get("DIFFUSION_DATA_SOURCE"):
        source = Path(os.environ["DIFFUSION_DATA_SOURCE"])
        if not (source / "train-images-idx3-ubyte.gz").is_file():
            pytest.fail(f"DIFFUSION_DATA_SOURCE={source} does not hold the MNIST raw .gz files")
        return source
    return fetch_raw(get_spec("mnist"), "download", REPO / ".cache")


@pytest.fixture(scope="session")
def mnist_raw_copy(mnist_raw_source, tmp_path_factory) -> Path:
    """A writable copy of the raw files, for tests that corrupt or remove them."""
    target = tmp_path_factory.mktemp("mnist_raw")
    for f in mnist_raw_source.glob("*.gz"):
        shutil.copy(f, target / f.name)
    return target


@pytest.fixture(scope="session")
def data_dir(mnist_raw_source, tmp_path_factory) -> Path:
    """A data folder holding the canonical MNIST file, prepared once per test session."""
    from diffusion_core.data import prepare_dataset

    folder = tmp_path_factory.mktemp("data")
    prepare_dataset("mnist", str(mnist_raw_source), folder)
    return folder


@pytest.fixture()
def smoke_overrides(mnist_raw_source, data_dir) -> dict:
    return {"data.source": str(mnist_raw_source), "data.data_dir": str(data_dir)}


@pytest.fixture(scope="session")
def smoke_run(mnist_raw_source, data_dir, tmp_path_factory) -> Path:
    """One trained smoke run (20 steps), shared by tests that only read it."""
    from diffusion_core import load_config, train

    run_dir = tmp_path_factory.mktemp("smoke_run")
    config = load_config("smoke", {"data.source": str(mnist_raw_source), "data.data_dir": str(data_dir)})
    train(config, run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="session")
def smoke_cond_run(mnist_raw_source, data_dir, tmp_path_factory) -> Path:
    """A trained class-conditional smoke run (20 steps), shared by tests that only read it."""
    from diffusion_core import load_config, train

    run_dir = tmp_path_factory.mktemp("smoke_cond_run")
    config = load_config("smoke", {"data.source": str(mnist_raw_source), "data.data_dir": str(data_dir),
                                   "model.num_classes": 10})
    train(config, run_dir, progress=False)
    return run_dir

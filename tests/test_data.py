import shutil
import socket

import pytest
import torch

from diffusion_core.data import DataError, load_split, prepare_dataset, read_metadata


def test_prepare_real_mnist(data_dir):
    prepared = prepare_dataset("mnist", "unused: the cache is valid", data_dir)
    images, labels = prepared.load("train")
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and set(labels.unique().tolist()) == set(range(10))
    test_images, _ = load_split(prepared.path, "test")
    assert test_images.shape == (10000, 1, 28, 28)
    assert read_metadata(prepared.path)["sha256"] == prepared.sha256
    # The class counts of the MNIST training set
    assert torch.bincount(labels).tolist()[:3] == [5923, 6742, 5958]


def test_same_files_same_sha256(mnist_raw_copy, data_dir, tmp_path):
    again = prepare_dataset("mnist", str(mnist_raw_copy), tmp_path)
    assert again.sha256 == prepare_dataset("mnist", "unused", data_dir).sha256


def test_torchvision_layout_is_found(mnist_raw_copy, tmp_path):
    nested = tmp_path / "root" / "MNIST" / "raw"
    shutil.copytree(mnist_raw_copy, nested)
    prepared = prepare_dataset("mnist", str(tmp_path / "root"), tmp_path / "data")
    assert prepared.path.is_file()


def test_wrong_md5_is_refused_and_nothing_written(mnist_raw_copy, tmp_path):
    corrupt = tmp_path / "raw"
    shutil.copytree(mnist_raw_copy, corrupt)
    path = corrupt / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    out = tmp_path / "data"
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz has MD5 .* expected ec29112d"):
        prepare_dataset("mnist", str(corrupt), out)
    assert not list(out.glob("*.safetensors")) and not list(out.glob(".*tmp"))


def test_missing_source_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist.*data.source"):
        prepare_dataset("mnist", str(tmp_path / "nowhere"), tmp_path / "data")


def test_missing_file_in_source(mnist_raw_copy, tmp_path):
    partial = tmp_path / "raw"
    shutil.copytree(mnist_raw_copy, partial)
    (partial / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz"):
        prepare_dataset("mnist", str(partial), tmp_path / "data")


def test_download_without_network_is_clear(tmp_path, monkeypatch):
    """The real download path, with the network made unreachable for certain (no DNS, no sockets)."""
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(DataError, match="could not download .*DIFFUSION_DATA_SOURCE"):
        prepare_dataset("fashion-mnist", "download", tmp_path / "data")
    assert not list((tmp_path / "data").glob("*.safetensors"))


def test_corrupt_cache_is_rebuilt(mnist_raw_copy, tmp_path):
    first = prepare_dataset("mnist", str(mnist_raw_copy), tmp_path)
    first.path.write_bytes(b"garbage")
    again = prepare_dataset("mnist", str(mnist_raw_copy), tmp_path)
    assert again.sha256 == first.sha256


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        prepare_dataset("svhn", "download", tmp_path)

import re
import shutil
import socket

import pytest
import torch

from diffusion_core.data import DataError, load_split, prepare_dataset, read_metadata, upload_dataset


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


def _bucket_keys(bucket: str) -> set[str]:
    from diffusion_core.storage import s3_client

    return {obj["Key"] for obj in s3_client().list_objects_v2(Bucket=bucket).get("Contents", [])}


def test_upload_dataset_puts_verified_files_where_prepare_reads_them(s3_endpoint, mnist_raw_source, data_dir,
                                                                     tmp_path, capsys):
    """`diffusion upload-dataset` against the stack's S3 store: the files from s3:// prepare to the very dataset
    the local folder gives."""
    from diffusion_core.cli import main

    main(["upload-dataset", "--dataset", "mnist", "--from", str(mnist_raw_source), "--to", "s3://data/datasets/mnist"])
    names = {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz"}
    assert _bucket_keys("data") == {f"datasets/mnist/{name}" for name in names}
    assert capsys.readouterr().out.count("uploaded s3://data/datasets/mnist/") == 4
    from_s3 = prepare_dataset("mnist", "s3://data/datasets/mnist", tmp_path / "from-s3")
    assert from_s3.sha256 == prepare_dataset("mnist", "unused: the cache is valid", data_dir).sha256


def test_upload_dataset_refuses_a_corrupt_file_before_uploading_anything(s3_endpoint, mnist_raw_copy, tmp_path,
                                                                          capsys):
    from diffusion_core.cli import main

    corrupt = tmp_path / "raw"
    shutil.copytree(mnist_raw_copy, corrupt)
    path = corrupt / "t10k-labels-idx1-ubyte.gz"  # the last file in upload order: nothing may go before the check
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # one flipped byte, same size
    path.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exited:
        main(["upload-dataset", "--dataset", "mnist", "--from", str(corrupt), "--to", "s3://data/datasets/mnist"])
    assert exited.value.code == 1
    assert re.search(r"t10k-labels-idx1-ubyte.gz has MD5 [0-9a-f]{32}, expected ec29112d", capsys.readouterr().err)
    assert _bucket_keys("data") == set()
    with pytest.raises(DataError, match="'/tmp/x' is not an S3 location: give s3://bucket/prefix"):
        upload_dataset("mnist", mnist_raw_copy, "/tmp/x")
    with pytest.raises(DataError, match="bucket 'missing' cannot be reached .*create it"):
        upload_dataset("mnist", mnist_raw_copy, "s3://missing/mnist")


def test_a_source_with_its_own_md5sums_is_a_new_version_and_replaces_the_cache(mnist_raw_source, data_dir, tmp_path):
    """Images added at the source (with its MD5SUMS): the next prepare in the same data folder is a new
    version holding them (counted independently from the files), and a wrong MD5SUMS is refused."""
    from conftest import grow_mnist_source

    folder = tmp_path / "data"
    shutil.copytree(data_dir, folder)
    source = grow_mnist_source(mnist_raw_source, tmp_path / "source", added=64)
    original = prepare_dataset("mnist", str(mnist_raw_source), folder)
    grown = prepare_dataset("mnist", str(source), folder)
    assert grown.sha256 != original.sha256
    images, labels = grown.load("train")
    base_images, base_labels = load_split(data_dir / "mnist.safetensors")
    assert images.shape[0] == base_images.shape[0] + 64
    assert torch.equal(images[-64:], base_images[:64]) and torch.equal(labels[-64:], base_labels[:64])
    assert prepare_dataset("mnist", str(mnist_raw_source), folder).sha256 == original.sha256  # back: rebuilt
    (source / "MD5SUMS").write_text((source / "MD5SUMS").read_text().replace("train-labels", "tran-labels"))
    with pytest.raises(DataError, match="MD5SUMS must list the MD5 of each of"):
        prepare_dataset("mnist", str(source), folder)

"""Datasets: raw files from a source → MD5-verified → one canonical safetensors file in memory.

Sources (`data.source`):
  - a local folder holding the original raw files (directly, or in `raw/` or `<Dataset>/raw/` below it);
  - `s3://bucket/prefix` holding the same files (boto3; endpoint and credentials from the environment);
  - `download`: the official mirrors (needs internet).
Every raw file is checked against the MD5 the dataset's publishers (and torchvision) use, unless the
source holds a manifest `MD5SUMS` (md5sum's format, "<md5>  <file>" per raw file): then it is a dataset
version of the team's own (the published files with images added, say) and its files are checked
against that. A cached canonical file is reused only while the MD5s it was built from are the ones the
source names now, so a changed source is a new dataset version at the next prepare. The
canonical file holds uint8 images [N, C, H, W] and int64 labels per split, plus metadata with a
sha256 over its content that identifies the dataset version in every later record.

`upload_dataset` (`diffusion upload-dataset`) puts verified raw files from a local folder into an
s3:// source, and checks the uploaded copy the way `prepare` will read it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .storage import download_s3_prefix, is_s3_uri, read_s3_text, upload_s3_files

CANONICAL_FORMAT = "diffusion-canonical-v1"
SPLITS = ("train", "test")


class DataError(RuntimeError):
    """A dataset, or a file read with it (extractor weights, cached reference features), could not be
    found, fetched or verified. The message says what to do."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    image_size: int
    num_classes: int
    files: tuple[tuple[str, str], ...]  # (file name, md5)
    mirrors: tuple[str, ...]            # base URLs for `download`
    folder: str                         # torchvision's folder name, for `<folder>/raw/` layouts
    parse: Callable[[Path], dict[str, tuple[np.ndarray, np.ndarray]]]


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) → numpy array. Format: magic (2 zero bytes, dtype 0x08, ndim), big-endian dims."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path.name} is not an IDX uint8 file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _parse_idx_dataset(raw: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(raw / f"{prefix}-images-idx3-ubyte.gz")[:, None]  # [N, 1, 28, 28]
        labels = _read_idx(raw / f"{prefix}-labels-idx1-ubyte.gz")
        if len(images) != len(labels):
            raise DataError(f"{split}: {len(images)} images but {len(labels)} labels")
        out[split] = (images, labels)
    return out


def _parse_cifar10_binary(raw: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The CIFAR-10 binary version: records of 1 label byte + 3072 pixel bytes (no pickles)."""
    members = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
    blobs: dict[str, bytes] = {}
    with tarfile.open(raw / "cifar-10-binary.tar.gz", "r:gz") as tar:
        for member in tar.getmembers():
            base = Path(member.name).name
            if member.isfile() and base.endswith(".bin"):
                blobs[base] = tar.extractfile(member).read()
    out = {}
    for split, names in members.items():
        records = np.frombuffer(b"".join(blobs[n] for n in names), dtype=np.uint8).reshape(-1, 3073)
        out[split] = (records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0])
    return out


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist", 1, 28, 10,
        files=(("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
               ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
               ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
               ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        folder="MNIST", parse=_parse_idx_dataset),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist", 1, 28, 10,
        files=(("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
               ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
               ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
               ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        folder="FashionMNIST", parse=_parse_idx_dataset),
    "cifar10": DatasetSpec(
        "cifar10", 3, 32, 10,
        files=(("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        folder="cifar-10-batches-bin", parse=_parse_cifar10_binary),
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def md5sum(path: Path) -> str:
    return file_digest(path, "md5")


MANIFEST = "MD5SUMS"


def parse_manifest(spec: DatasetSpec, text: str, where: str) -> dict[str, str]:
    """The MD5 per raw file a source's MD5SUMS names; a DataError if it does not name exactly spec's files."""
    md5s = {}
    for line in text.splitlines():
        if line.strip():
            digest, _, name = line.strip().partition(" ")
            md5s[name.strip().lstrip("*")] = digest.lower()
    wanted = {name for name, _ in spec.files}
    if set(md5s) != wanted or not all(len(d) == 32 for d in md5s.values()):
        raise DataError(f"{where} must list the MD5 of each of {', '.join(sorted(wanted))} once "
                        f"(`md5sum {' '.join(sorted(wanted))} > {MANIFEST}`); it lists {', '.join(sorted(md5s)) or 'nothing'}")
    return md5s


def source_md5s(spec: DatasetSpec, source: str) -> dict[str, str]:
    """The MD5 each raw file must have at `source`: its MD5SUMS if it holds one, else the published ones."""
    if source == "download":
        text, where = None, ""
    elif is_s3_uri(source):
        where = source.rstrip("/") + "/" + MANIFEST
        text = read_s3_text(where)
    else:
        folder = _local_raw_folder(spec, Path(source).expanduser())
        manifest = None if folder is None else folder / MANIFEST
        text, where = (manifest.read_text(), str(manifest)) if manifest and manifest.is_file() else (None, "")
    return dict(spec.files) if text is None else parse_manifest(spec, text, where)


def verify_raw_files(spec: DatasetSpec, folder: Path, md5s: dict[str, str] | None = None) -> None:
    """Every raw file present with its MD5 (`md5s`, default the published ones), or a DataError naming the file."""
    for name, expected in (md5s or dict(spec.files)).items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{spec.name}: raw file {name} missing in {folder}")
        actual = md5sum(path)
        if actual != expected:
            raise DataError(
                f"{spec.name}: {path} has MD5 {actual}, expected {expected}: the file is corrupt, truncated "
                "or from another dataset. Delete it and fetch the original again."
            )


def _local_candidates(spec: DatasetSpec, source: Path) -> list[Path]:
    return [source, source / "raw", source / spec.folder / "raw"]


def _local_raw_folder(spec: DatasetSpec, source: Path) -> Path | None:
    """The first of the folders `data.source` may name that holds all the raw files, or None."""
    return next((folder for folder in _local_candidates(spec, source)
                 if all((folder / name).is_file() for name, _ in spec.files)), None)


def _find_local_raw(spec: DatasetSpec, source: Path) -> Path:
    if not source.is_dir():
        raise DataError(
            f"data source folder {source} does not exist. Point data.source at the folder that holds "
            f"{', '.join(n for n, _ in spec.files)}, an s3://bucket/prefix, or 'download' (needs internet)."
        )
    folder = _local_raw_folder(spec, source)
    if folder is not None:
        return folder
    candidates = _local_candidates(spec, source)
    raise DataError(
        f"{spec.name}: none of {', '.join(str(c) for c in candidates)} holds all of "
        f"{', '.join(n for n, _ in spec.files)}. Copy the original files there, or use data.source=download."
    )


def _download(spec: DatasetSpec, target: Path) -> None:
    from torchvision.datasets.utils import download_url

    target.mkdir(parents=True, exist_ok=True)
    for name, md5 in spec.files:
        if (target / name).is_file() and md5sum(target / name) == md5:
            continue
        errors = []
        for mirror in spec.mirrors:
            try:
                download_url(mirror + name, str(target), filename=name, md5=md5)
                break
            except Exception as exc:  # network errors come in many types; all mean "try the next mirror"
                errors.append(f"{mirror}: {exc}")
        else:
            raise DataError(
                f"{spec.name}: could not download {name} ({'; '.join(errors)}). Without internet, set "
                "data.source (or DIFFUSION_DATA_SOURCE) to a local folder or s3:// prefix holding the raw files."
            )


def fetch_raw(spec: DatasetSpec, source: str, data_dir: Path, md5s: dict[str, str] | None = None) -> Path:
    """Make the raw files available locally, verified against `md5s` (default: what the source names);
    return their folder."""
    md5s = source_md5s(spec, source) if md5s is None else md5s
    if source == "download":
        folder = data_dir / "raw" / spec.name
        _download(spec, folder)
    elif is_s3_uri(source):
        folder = data_dir / "raw" / spec.name
        download_s3_prefix(source, [name for name, _ in spec.files], folder)
    else:
        folder = _find_local_raw(spec, Path(source).expanduser())
    verify_raw_files(spec, folder, md5s)
    return folder


def upload_dataset(name: str, source: str | Path, uri: str) -> list[str]:
    """Upload a dataset's raw files from the local folder `source` (as `data.source` finds them) to
    `uri` (s3://bucket/prefix; endpoint and credentials from the environment). Every file's MD5 is
    checked before anything is uploaded; then the files are fetched back from `uri` and checked again,
    as `prepare` will. Returns the URIs written."""
    spec = get_spec(name)
    if not is_s3_uri(uri) or not uri[5:].partition("/")[0]:
        raise DataError(f"{uri!r} is not an S3 location: give s3://bucket/prefix")
    folder = _find_local_raw(spec, Path(source).expanduser())
    verify_raw_files(spec, folder, source_md5s(spec, str(folder)))
    manifest = [folder / MANIFEST] if (folder / MANIFEST).is_file() else []  # a version of the team's own
    written = upload_s3_files([folder / file for file, _ in spec.files] + manifest, uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            fetch_raw(spec, uri, Path(tmp))
        except DataError as exc:
            raise DataError(f"the uploaded copy at {uri} does not verify ({exc}): upload it again") from exc
    return written


def content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of the tensors, in sorted name order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class PreparedDataset:
    spec: DatasetSpec
    path: Path
    sha256: str

    def load(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        return load_split(self.path, split)


def canonical_path(spec: DatasetSpec, data_dir: Path) -> Path:
    return data_dir / f"{spec.name}.safetensors"


def read_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != CANONICAL_FORMAT:
        raise DataError(f"{path} is not a canonical dataset file (format {meta.get('format')!r}); delete it")
    return meta


def prepare_dataset(name: str, source: str, data_dir: str | Path, *, verify_cache: bool = True,
                    consult_source: bool = True) -> PreparedDataset:
    """Raw files → canonical file, once. A valid cached file is reused (its content hash rechecked) while
    it is the version the source holds (without `consult_source`, as the training ranks do after their
    launcher prepared the data: whatever version is cached)."""
    spec = get_spec(name)
    data_dir = Path(data_dir)
    path = canonical_path(spec, data_dir)
    md5s = source_md5s(spec, source) if consult_source else None
    if path.is_file():
        try:
            meta = read_metadata(path)
            same_source = md5s is None or json.loads(meta["raw_md5"]) == md5s  # else the source changed
            if same_source and (not verify_cache or content_sha256(load_file(str(path))) == meta["sha256"]):
                return PreparedDataset(spec, path, meta["sha256"])
        except Exception:
            pass  # unreadable or stale cache: rebuild it below
    if md5s is None:  # nothing usable cached: this is a prepare after all
        md5s = source_md5s(spec, source)
    raw = fetch_raw(spec, source, data_dir, md5s)
    tensors = {}
    for split, (images, labels) in spec.parse(raw).items():
        tensors[f"{split}.images"] = torch.from_numpy(np.ascontiguousarray(images))
        tensors[f"{split}.labels"] = torch.from_numpy(labels.astype(np.int64))
    sha = content_sha256(tensors)
    meta = {
        "format": CANONICAL_FORMAT, "dataset": spec.name, "sha256": sha,
        "raw_md5": json.dumps(md5s),
        "sizes": json.dumps({s: int(tensors[f"{s}.images"].shape[0]) for s in SPLITS}),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return PreparedDataset(spec, path, sha)


def load_split(path: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, C, H, W], int64 labels [N]) of one split of a canonical file."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(f"{split}.images"), f.get_tensor(f"{split}.labels")


"""S3 access through boto3. Endpoint and credentials come from the environment only:
AWS_ENDPOINT_URL_S3 (or MLFLOW_S3_ENDPOINT_URL), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from .atomic import atomic_path

T = TypeVar("T")


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix → ("bucket", "some/prefix")."""
    if not is_s3_uri(uri) or len(uri) <= 5:
        raise ValueError(f"not an s3:// URI: {uri!r} (expected s3://bucket/prefix)")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def s3_client():
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    return boto3.client(
        "s3", endpoint_url=endpoint,
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30),
    )


def with_retries(action: Callable[[], T], what: str, attempts: int = 4, base_delay_s: float = 0.5) -> T:
    """Run `action`, retrying with exponential backoff; then raise a clear error naming `what`."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:
            if attempt == attempts:
                raise RuntimeError(f"{what} failed after {attempts} attempts: {exc}") from exc
            time.sleep(base_delay_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def upload_s3_files(files: Iterable[Path], uri: str) -> list[str]:
    """Upload each file to s3://bucket/prefix/<its name>, after checking that the bucket answers; return the
    URIs written. Any failure is a DataError naming the object and what to check."""
    from .data import DataError

    bucket, prefix = split_s3_uri(uri)
    client = s3_client()
    try:
        client.head_bucket(Bucket=bucket)
    except Exception as exc:
        raise DataError(f"bucket {bucket!r} cannot be reached ({exc}): create it, or check the endpoint "
                        "(AWS_ENDPOINT_URL_S3 or MLFLOW_S3_ENDPOINT_URL) and the AWS_* credentials") from exc
    written = []
    for path in files:
        key = f"{prefix}/{path.name}" if prefix else path.name
        try:
            with_retries(lambda path=path, key=key: client.upload_file(str(path), bucket, key),
                         f"upload of {path} to s3://{bucket}/{key}")
        except RuntimeError as exc:
            raise DataError(f"{exc}. Check the bucket, endpoint and credentials in the environment.") from exc
        written.append(f"s3://{bucket}/{key}")
    return written


def read_s3_text(uri: str) -> str | None:
    """The text of the object at `uri`, or None when there is no such object (the client retries other
    failures itself; what is left is a DataError naming the object)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from .data import DataError

    bucket, key = split_s3_uri(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except (ClientError, BotoCoreError) as exc:
        if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise DataError(f"reading {uri} failed ({exc}). Check the bucket, prefix, endpoint and credentials.") from exc


def download_s3_prefix(uri: str, names: Iterable[str], target: Path) -> None:
    """Download s3://bucket/prefix/<name> for each name into `target` (atomically per file)."""
    from .data import DataError

    bucket, prefix = split_s3_uri(uri)
    client = s3_client()
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        key = f"{prefix}/{name}" if prefix else name

        def fetch(key=key, name=name) -> None:
            with atomic_path(target / name) as tmp:
                client.download_file(bucket, key, str(tmp))

        try:
            with_retries(fetch, f"download of s3://{bucket}/{key}")
        except RuntimeError as exc:
            raise DataError(f"{exc}. Check the bucket, prefix, endpoint and credentials in the environment.") from exc


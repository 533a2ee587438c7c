"""A local S3-compatible endpoint that keeps its objects across restarts.

moto's S3 server (in this process) holds objects in memory and forgets them when it stops. This
program adds a mirror: every `--sync-every` seconds, and once more on SIGTERM/SIGINT, each bucket's
new or changed objects (by ETag) are copied into `--state-dir/<bucket>/blobs/` with an `index.json`
(key → ETag, blob), and deleted ones are removed; at start the mirror is loaded back. Writes are
atomic (temporary file, then rename), so a crash leaves the last complete mirror; a `kill -9` loses
at most the last `--sync-every` seconds of changes. Any credentials are accepted.

    python infra/s3_server.py --port 9000 --state-dir infra/.state/s3 --bucket diffusion
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

import boto3
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

INDEX = "index.json"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Mirror:
    """Copies the buckets of an S3 endpoint into a folder and back."""

    def __init__(self, client, root: Path) -> None:
        self.client, self.root = client, root

    def _listing(self, bucket: str) -> dict[str, str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {obj["Key"]: obj["ETag"] for page in pages for obj in page.get("Contents", [])}

    @staticmethod
    def _blob_name(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def _read_index(self, bucket: str) -> dict[str, str]:
        path = self.root / bucket / INDEX
        return json.loads(path.read_text()) if path.is_file() else {}

    def restore(self) -> None:
        """Create every mirrored bucket and upload its objects; record the endpoint's new ETags."""
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            bucket = folder.name
            self.client.create_bucket(Bucket=bucket)
            index = {}
            for key in self._read_index(bucket):
                self.client.upload_file(str(folder / "blobs" / self._blob_name(key)), bucket, key)
                index[key] = self.client.head_object(Bucket=bucket, Key=key)["ETag"]
            _atomic_write(folder / INDEX, json.dumps(index).encode())

    def sync(self) -> None:
        """Bring the folder up to date with the endpoint."""
        buckets = [b["Name"] for b in self.client.list_buckets()["Buckets"]]
        for bucket in buckets:
            blobs = self.root / bucket / "blobs"
            blobs.mkdir(parents=True, exist_ok=True)
            old, new = self._read_index(bucket), {}
            for key, etag in self._listing(bucket).items():
                if old.get(key) != etag:
                    tmp = blobs / f".{self._blob_name(key)}.tmp"
                    try:
                        self.client.download_file(bucket, key, str(tmp))
                    except ClientError:  # deleted since the listing: the next sync sees it gone
                        continue
                    os.replace(tmp, blobs / self._blob_name(key))
                new[key] = etag
            if new != old:
                _atomic_write(self.root / bucket / INDEX, json.dumps(new).encode())
            for key in set(old) - set(new):
                (blobs / self._blob_name(key)).unlink(missing_ok=True)
        for folder in (p for p in self.root.iterdir() if p.is_dir() and p.name not in buckets):
            shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--state-dir", type=Path, required=True, help="folder that keeps the objects")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create if missing (repeatable)")
    parser.add_argument("--sync-every", type=float, default=2.0, help="seconds between mirror updates")
    args = parser.parse_args()

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request (the mirror lists every few s)
    server = ThreadedMotoServer(ip_address=args.host, port=args.port, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=f"http://{args.host}:{args.port}", region_name="us-east-1",
                          aws_access_key_id="mirror", aws_secret_access_key="mirror")
    args.state_dir.mkdir(parents=True, exist_ok=True)
    mirror = Mirror(client, args.state_dir)
    mirror.restore()
    for bucket in args.bucket:
        if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
            client.create_bucket(Bucket=bucket)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"S3 endpoint http://{args.host}:{args.port}, objects kept in {args.state_dir}", flush=True)
    while not stop.wait(args.sync_every):
        mirror.sync()
    mirror.sync()
    server.stop()


if __name__ == "__main__":
    main()

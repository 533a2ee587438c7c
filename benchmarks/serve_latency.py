"""Latency and throughput of a model served by `mlflow models serve` (the REST scoring server).

    python benchmarks/serve_latency.py --model models:/ddpm-mnist@champion
    python benchmarks/serve_latency.py --model runs/smoke/model --workers 2 --clients 4

`--model` is a model URI (needs MLFLOW_TRACKING_URI for models:/) or an exported model folder (made
into a pyfunc model first, as registration does). The server runs locally (`--env-manager local`,
`--workers` uvicorn processes, CPU unless a GPU is visible). Printed: the server's start time; for each
of `--steps` the latency p50/p95 of `--requests` sequential requests of `--images` images (a
conditional model: classes 0, 1, … in turn; else a request without classes), after one warm-up
request; and images/s at saturation: `--clients` concurrent clients sending the first step count's
request for `--seconds`. The fp32 matmul GFLOP/s of this machine, measured before and after in the
same run, is printed beside them (this kind of machine's speed drifts by up to 2× between days).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from diffusion_core.runtime import matmul_gflops


def start_server(model_uri: str, workers: int, log: Path, timeout_s: float = 600) -> tuple[subprocess.Popen, str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, start = f"http://127.0.0.1:{port}", time.perf_counter()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", str(workers), "-t", "600"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    while time.perf_counter() - start < timeout_s:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5):
                return proc, url, time.perf_counter() - start
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    os.killpg(proc.pid, 9)
    raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")


def invoke(url: str, body: bytes) -> float:
    """Seconds for one request (which must succeed)."""
    start = time.perf_counter()
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()
    return time.perf_counter() - start


def request_body(conditional: bool, num_classes: int | None, images: int, steps: int) -> bytes:
    if conditional:
        return json.dumps({"inputs": {"class": [i % num_classes for i in range(images)]},
                           "params": {"n": 1, "steps": steps}}).encode()
    return json.dumps({"dataframe_records": [{}], "params": {"n": images, "steps": steps}}).encode()


def saturation(url: str, body: bytes, images: int, clients: int, seconds: float) -> float:
    """Images/s with `clients` threads each sending requests back to back for `seconds`."""
    done = [0] * clients
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        while time.perf_counter() < deadline:
            invoke(url, body)
            done[i] += images

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model URI or exported model folder")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()

    import mlflow

    from diffusion_core.checkpoint import load_model
    from diffusion_core.serving import save_pyfunc_model

    with tempfile.TemporaryDirectory() as tmp:
        uri = args.model
        folder = Path(uri) if Path(uri).is_dir() else Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp))
        if not (folder / "MLmodel").is_file():
            uri = str(save_pyfunc_model(Path(tmp) / "pyfunc", folder))
        config = load_model(folder).config
        peak_before = matmul_gflops()
        proc, url, start_s = start_server(uri, args.workers, Path(tmp) / "serve.log")
        try:
            latency = {}
            for steps in args.steps:
                body = request_body(config.conditional, config.model.num_classes, args.images, steps)
                invoke(url, body)  # warm-up
                times = sorted(invoke(url, body) for _ in range(args.requests))
                latency[steps] = {"p50_s": statistics.median(times),
                                  "p95_s": times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]}
            body = request_body(config.conditional, config.model.num_classes, args.images, args.steps[0])
            images_per_s = saturation(url, body, args.images, args.clients, args.seconds)
        finally:
            os.killpg(proc.pid, 9)
            proc.wait()
        peak_after = matmul_gflops()

    result = {"model": args.model, "preset": config.name, "conditional": config.conditional,
              "model_channels": config.model.base_channels, "channel_mults": list(config.model.channel_mults),
              "timesteps": config.diffusion.timesteps, "sampler": config.sample.sampler, "workers": args.workers,
              "clients": args.clients, "images_per_request": args.images, "requests": args.requests,
              "server_start_s": start_s, "latency": latency, "saturation_steps": args.steps[0],
              "saturation_images_per_s": images_per_s, "matmul_fp32_gflops_before": peak_before,
              "matmul_fp32_gflops_after": peak_after, "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch": torch.__version__,
              "device": "cuda" if torch.cuda.is_available() else "cpu"}
    print(f"{args.model} ({config.name}, {result['device']}, {args.workers} worker(s)); server up in {start_s:.1f} s; "
          f"fp32 matmul {peak_before:.0f} / {peak_after:.0f} GFLOP/s (before / after)")
    for steps, row in latency.items():
        print(f"{args.images} images at {steps:>3} steps: p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s")
    print(f"saturation ({args.clients} clients, {args.steps[0]} steps): {images_per_s:.1f} images/s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

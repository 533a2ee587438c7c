"""Locating torch-fidelity's Inception-v3 weights (`inception-v3-compat`, the standard FID network).

Where they come from, in order: an explicit path (`--inception-weights`), the environment variable
DIFFUSION_INCEPTION_WEIGHTS, the torch hub cache where torch-fidelity keeps them
(`$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`), and last a download of
torch-fidelity's published file into that same cache. Without the file and without a connection to
the download host (probed with a 3 s socket connect) this fails at once, so no time is spent
sampling first.

The file is read once: its bytes are hashed and loaded with `torch.load(weights_only=True)` (a file
holding anything but tensors is refused without running), and that state dict goes into the
extractor (torch-fidelity never opens the file). The downloaded or hub-cached file must match the
sha256 prefix published in its name (torch.hub's convention); an explicitly given file is the
caller's choice, and its own sha256 names the extractor.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from ..data import DataError

WEIGHTS_ENV = "DIFFUSION_INCEPTION_WEIGHTS"
WEIGHTS_FILE = Path(urlparse(URL_INCEPTION_V3).path).name  # weights-inception-2015-12-05-6726825d.pth
PUBLISHED_SHA256_PREFIX = WEIGHTS_FILE.rsplit("-", 1)[1].split(".")[0]  # 6726825d
PROBE_TIMEOUT_S = 3.0


def hub_cache_path() -> Path:
    """Where torch-fidelity (through torch.hub) caches the weights: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def resolve_inception_weights(path: str | Path | None = None) -> tuple[Path, bool]:
    """(the local Inception-v3 weights file, whether it must match the published hash), downloading it
    into the hub cache if it is reachable."""
    explicit = path or os.environ.get(WEIGHTS_ENV)
    if explicit:
        explicit = Path(explicit).expanduser()
        if not explicit.is_file():
            raise DataError(f"Inception weights file {explicit} (from --inception-weights or {WEIGHTS_ENV}) "
                               "does not exist")
        return explicit, False
    cached = hub_cache_path()
    if cached.is_file():
        return cached, True
    if not _reachable(URL_INCEPTION_V3):
        raise DataError(
            f"the Inception-v3 feature extractor needs {WEIGHTS_FILE}, which is not in torch-fidelity's "
            f"cache {cached.parent} ($TORCH_HOME/hub/checkpoints/), and {urlparse(URL_INCEPTION_V3).hostname} "
            f"cannot be reached to download it. Fetch {URL_INCEPTION_V3} on a machine with internet, then copy it "
            f"into {cached.parent}, or point --inception-weights / {WEIGHTS_ENV} at it; or use --extractor lenet."
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    # writes a temp file, then renames; hash_prefix refuses a download that does not match
    torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), hash_prefix=PUBLISHED_SHA256_PREFIX, progress=True)
    return cached, True


def load_inception_weights(path: Path, verify: bool) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, sha256) of the file, read once: hashed, checked against the published prefix if
    `verify`, then loaded with weights_only=True."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if verify and not digest.startswith(PUBLISHED_SHA256_PREFIX):
        raise DataError(f"{path} has sha256 {digest}, not the published {PUBLISHED_SHA256_PREFIX}…: it is not "
                           f"torch-fidelity's {WEIGHTS_FILE}; delete it (it is downloaded again when online)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a plain state dict"
        raise DataError(f"{path} is not a plain PyTorch state dict of tensors ({exc})") from exc
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise DataError(f"{path} is not a state dict of tensors")
    return state, digest

"""A training worker whose rank 1 fails on its third step: for the launcher's failure test."""

import os
import sys

from diffusion_core import cli
from diffusion_core.denoiser import Denoiser

real_loss, calls = Denoiser.loss, []


def failing_loss(self, *args, **kwargs):
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) == 3:
        raise RuntimeError("injected failure on rank 1")
    return real_loss(self, *args, **kwargs)


Denoiser.loss = failing_loss
cli.main(sys.argv[1:])

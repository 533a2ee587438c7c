"""A compact LeNet-style digit classifier: the domain feature extractor for 28×28 grayscale datasets.

Architecture: conv5×5(1→32) → ReLU → maxpool2 → conv5×5(32→64) → ReLU → maxpool2 → fc(1024→128) →
ReLU → fc(128→classes). The 128-d ReLU output of the first fully connected layer (`fc1`, the
penultimate layer) is the feature space for FID, KID and precision/recall; the logits give the
class statistics. ~184 k parameters (0.74 MB as float32).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ..images import to_model_space

FEATURE_DIM = 128


class LeNet(nn.Module):
    """Input: uint8 images [B, 1, 28, 28]; they are mapped to [-1, 1] inside, as for the diffusion model."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5)
        self.conv2 = nn.Conv2d(32, 64, 5)
        self.fc1 = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'fc1': penultimate activations [B, 128], 'logits': [B, classes]}."""
        x = to_model_space(images_u8)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        fc1 = F.relu(self.fc1(x.flatten(1)))
        return {"fc1": fc1, "logits": self.fc2(fc1)}

    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.features(images_u8)["logits"]


def load_classifier(weights_path: str | Path) -> LeNet:
    """A frozen LeNet from a safetensors state dict (the class count is read from the last layer)."""
    state = load_file(str(weights_path))
    net = LeNet(int(state["fc2.weight"].shape[0]))
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int = 10, epochs: int = 3,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0, progress: bool = True) -> LeNet:
    """Adam with a cosine learning-rate decay to 0 over all steps; cross-entropy on the logits.

    Seeded: the initial weights and the per-epoch shuffles come from `seed` only (CPU training, so a
    seed gives the same weights on the same machine and library versions). The caller's global RNG
    state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = LeNet(num_classes)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    shuffle = torch.Generator().manual_seed(seed)
    net.train()
    with tqdm(total=total, desc="training classifier", unit="step", disable=not progress) as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(images), generator=shuffle)
            for start in range(0, len(images), batch_size):
                index = order[start: start + batch_size]
                loss = F.cross_entropy(net(images[index]), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    return net.eval().requires_grad_(False)


@torch.no_grad()
def predict_probs(net: LeNet, images: torch.Tensor, batch_size: int = 1000,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Softmax class probabilities [N, classes] (on the CPU) for uint8 images [N, 1, 28, 28]."""
    net = net.to(device).eval()
    return torch.cat([F.softmax(net(chunk.to(device)), dim=1).cpu() for chunk in images.split(batch_size)])


def accuracy(net: LeNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose most probable class is the label."""
    return (predict_probs(net, images).argmax(1) == labels).float().mean().item()


def class_statistics(probs: torch.Tensor, threshold: float = 0.9) -> dict[str, float]:
    """From class probabilities [N, K]:

    confident_fraction: share of samples whose top probability exceeds `threshold` (garbage → low);
    class_entropy: entropy in nats of the histogram of predicted classes (ln K for a uniform spread,
    0 if every sample is the same class, so mode collapse shows).
    """
    confident = (probs.max(1).values > threshold).float().mean().item()
    histogram = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).double() / len(probs)
    nonzero = histogram[histogram > 0]
    return {"confident_fraction": confident, "class_entropy": float(-(nonzero * nonzero.log()).sum())}

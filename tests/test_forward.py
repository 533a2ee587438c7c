import pytest
import torch

from diffusion_core import NoiseSchedule, q_sample, save_forward_process_grid


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample_moments(kind):
    s = NoiseSchedule(1000, kind)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    for step in [0, 100, 500, 999]:
        t = torch.full((x0.shape[0],), step, dtype=torch.long)
        xt = q_sample(s, x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
        ab = s.alpha_bars[step].item()
        assert xt.mean().item() == pytest.approx(ab**0.5 * 0.7, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.02, abs=2e-5)


def test_forward_grid_png(tmp_path):
    s = NoiseSchedule(100)
    path = save_forward_process_grid(s, torch.rand(2, 1, 28, 28) * 2 - 1, tmp_path / "f.png", frames=5)
    from PIL import Image

    img = Image.open(path)
    # 2 rows × 6 columns of 28-px tiles with 2-px padding, upscaled 2×
    assert img.size == (2 * (6 * 30 + 2), 2 * (2 * 30 + 2))

"""Denoising diffusion from scratch: schedules, forward process, U-Net, training, DDPM/DDIM sampling."""

from .checkpoint import LoadedModel, export_model, load_model
from .config import Config, ConfigError, load_config
from .data import DATASETS, DataError, prepare_dataset
from .denoiser import Denoiser
from .ema import EMA
from .forward import q_sample, save_forward_process_grid
from .samplers import ddim_sample, ddpm_sample, dpm_solver_sample, generate_batches, sample, sampling_timesteps
from .schedule import NoiseSchedule
from .train import TrainingDiverged, train
from .unet import UNet, UNetConfig

__all__ = [
    "Config", "ConfigError", "DATASETS", "DataError", "Denoiser", "EMA", "LoadedModel", "NoiseSchedule",
    "TrainingDiverged", "UNet", "UNetConfig", "ddim_sample", "ddpm_sample", "dpm_solver_sample", "export_model", "generate_batches",
    "load_config", "load_model", "prepare_dataset", "q_sample", "sample", "sampling_timesteps",
    "save_forward_process_grid", "train",
]

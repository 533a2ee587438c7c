"""What a consistency student can learn at best: the teacher's own chain of distillation steps, scored at N.

    python benchmarks/teacher_chain.py --teacher <model> --set distill.guidance=0.15 --set distill.ode_steps=8 \
        [--set distill.teacher_order=2] [-n 10000] [--bootstrap 20] [--seed 0] [--out chain.json]

The student is pulled towards the teacher's ODE steps of distill.ode_steps, distill.teacher_order and
distill.guidance (`distill.teacher_ode_step`). Taken one after another from t = T−1 down to clean data
(`distill.teacher_chain`), those steps are a sampler of their own, and the map they draw is the one the student
learns to jump along: a student that learned it exactly samples these images' distribution. Its FID bounds what
distillation at those settings reaches. The images are drawn for the class mix of the reference split, from the
x_T that `diffusion evaluate` draws at its default 256 images per batch (`samplers.batch_generator`), and scored by
the same function, with the fp32 matmul GFLOP/s before and after beside the time.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

from diffusion_core.checkpoint import load_model
from diffusion_core.data import prepare_dataset
from diffusion_core.distill import student_config, teacher_chain, teacher_for, teacher_ode_step
from diffusion_core.evaluation.evaluator import evaluate, format_table, save_metrics
from diffusion_core.evaluation.protocol import REFERENCE_SPLIT, scoring_labels
from diffusion_core.images import to_uint8
from diffusion_core.runtime import matmul_gflops, tune_cpu_runtime
from diffusion_core.samplers import batch_generator

BATCH = 256  # images per chain; the denoiser runs them in passes of its own size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="exported model folder, run folder or training checkpoint")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="distill.* settings, as distil")
    parser.add_argument("-n", "--num-samples", type=int, default=10_000)
    parser.add_argument("--bootstrap", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="metrics JSON")
    args = parser.parse_args()

    loaded = load_model(args.teacher, "cpu")
    config = student_config(loaded.config, args.overrides)  # validates the settings before any work
    cfg = config.distill
    teacher = teacher_for(loaded.denoiser, cfg, torch.device("cpu"))
    schedule = loaded.denoiser.schedule
    levels = teacher_chain(schedule, cfg.ode_steps)
    prepared = prepare_dataset(config.data.dataset, config.data.source, config.data.data_dir)
    shape = (prepared.spec.channels, prepared.spec.image_size, prepared.spec.image_size)
    labels = (scoring_labels(prepared, REFERENCE_SPLIT, config.model.num_classes, args.num_samples, args.seed)
              if config.conditional else None)
    evaluations = sum(2 if cfg.teacher_order == 2 and t_next >= 0 else 1 for t_next in levels[1:])
    evaluations *= 2 if cfg.guidance > 0 else 1
    print(f"chain of {len(levels) - 1} steps {levels}: {evaluations} network evaluations per image", flush=True)

    peak_before = matmul_gflops()
    tune_cpu_runtime()
    start, batches = time.perf_counter(), []
    with torch.no_grad():
        for k, first in enumerate(tqdm(range(0, args.num_samples, BATCH), desc="chain")):
            b = min(BATCH, args.num_samples - first)
            x = torch.randn(b, *shape, generator=batch_generator(args.seed, k))  # x_T as the samplers draw it
            cond = {} if labels is None else {"class_labels": labels[first:first + b]}
            for t, t_next in zip(levels[:-1], levels[1:]):
                x = teacher_ode_step(teacher, x, torch.full((b,), t), torch.full((b,), t_next), cfg.teacher_order,
                                     **cond)
            batches.append(to_uint8(x))
    seconds = time.perf_counter() - start
    tag = f"chain{cfg.ode_steps}_order{cfg.teacher_order}_w{cfg.guidance:g}"
    result = evaluate(torch.cat(batches), data=config.data, labels=labels, tag=tag, seed=args.seed,
                      bootstrap=args.bootstrap)
    result.update(levels=levels, network_evaluations=evaluations, images_per_s=args.num_samples / seconds,
                  matmul_gflops=[peak_before, matmul_gflops()], settings=args.overrides,
                  teacher={"name": loaded.config.name, **loaded.info})
    if args.out:
        save_metrics(args.out, result)
    print(format_table(result))
    print(f"{args.num_samples} images in {seconds:.0f} s ({args.num_samples / seconds:.1f} images/s), "
          f"fp32 matmul {peak_before:.0f} / {result['matmul_gflops'][1]:.0f} GFLOP/s before / after")


if __name__ == "__main__":
    main()

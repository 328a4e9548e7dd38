"""The L1 vs L2 vs Huber study of nbs/04_annotated_diffusion.ipynb, at full length.

    python benchmarks/loss_study.py [--characters 100] [--poses-per-character 8] [--size 32] [--steps 600]
                                    [--batch-size 32] [--samples 128] [--sampling-steps 50] [--seed 0]
                                    [--out benchmarks/results]

Builds synthetic characters (anime_pose.synthetic), trains one TinyUNet per loss on the targets of
the training characters (same initial weights, batches, timesteps, noise and step count), keeps the
validation and test characters as the held-out set, samples each model from the same noise, and
scores FRD-64 (the Fréchet distance in the features of a fixed random conv net, see the notebook).
Writes OUT/loss_study.md (table, command, configuration, timings, machine load) and
OUT/loss_study.png (curves and samples), and prints the table. 740 s measured with --threads 1
on two cores shared with other work (load average about 6)."""
import argparse, json, os, platform, sys, time

import torch

from anime_pose.core import atomic_path, images_to_tensor
from anime_pose.diffusion import loss_study, plot_study, study_table
from anime_pose.synthetic import synthetic_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--characters', type=int, default=100)
    parser.add_argument('--poses-per-character', type=int, default=8)
    parser.add_argument('--size', type=int, default=32, help='image side in pixels (a multiple of 4)')
    parser.add_argument('--steps', type=int, default=600, help='training steps per loss')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--width', type=int, default=16, help='TinyUNet channels at full resolution')
    parser.add_argument('--samples', type=int, default=128, help='images generated per loss for FRD-64')
    parser.add_argument('--sampling-steps', type=int, default=50)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--out', default='benchmarks/results')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before, start = os.getloadavg(), time.perf_counter()

    dataset = synthetic_dataset(args.characters, args.poses_per_character, args.size, args.seed, num_proc=1, progress=False)
    train_images = images_to_tensor(dataset['train']['target'], args.size)
    held_out_images = images_to_tensor([*dataset['validation']['target'], *dataset['test']['target']], args.size)
    results = loss_study(train_images, held_out_images, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         samples=args.samples, sampling_steps=args.sampling_steps, model_config=dict(width=args.width))
    seconds, load_after = time.perf_counter() - start, os.getloadavg()

    table = study_table(results)
    command = 'python benchmarks/loss_study.py ' + ' '.join(sys.argv[1:])
    report = f"""# L1 vs L2 vs Huber: the same TinyUNet, steps and seeds

Command: `{command.strip()}`

{table}

- **FRD-64**: Fréchet distance between Gaussians fitted to the 64 features (two He-normal 3×3 stride-2
  conv + ReLU layers of 16 channels, weights from seed 0, 2×2 average pool) of {args.samples} generated
  images and of the {len(held_out_images)} held-out real images (validation + test characters, never trained on).
  Lower is better; the floor row scores {args.samples} real training images the same way.
- Held-out losses: the final model on the held-out images, t and ε fixed by seed {args.seed}, in each of the three measures.
- Data: {args.characters} synthetic characters × {args.poses_per_character} poses at {args.size}×{args.size},
  {len(train_images)} training targets ({len(dataset['train'])} rows), character-disjoint held-out set.
- Configuration: `{json.dumps(results['config'])}`
- Wall time {seconds:.0f} s in all on {args.threads} torch threads ({os.cpu_count()} cores, {platform.processor() or platform.machine()}),
  torch {torch.__version__}; load average (1, 5, 15 min) before {' '.join(f'{v:.2f}' for v in load_before)},
  after {' '.join(f'{v:.2f}' for v in load_after)} (other work on the machine slows the timings, not the other figures).
"""
    os.makedirs(args.out, exist_ok=True)
    with atomic_path(os.path.join(args.out, 'loss_study.md')) as path: path.write_text(report)
    figure = plot_study(results)
    with atomic_path(os.path.join(args.out, 'loss_study.png')) as path: figure.savefig(path, dpi=80)
    print(report)


if __name__ == '__main__':
    main()

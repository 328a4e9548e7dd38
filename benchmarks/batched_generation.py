"""Batched against one-at-a-time generation: images/s of the bundled model on the demo's held-out triples.

Each setting (threads × batch size) draws the same triples with `anime_pose.evaluate.generation_speed`:
the settings alternate within each round, their order reversed every other round, and each one's
median over the rounds is kept (wall-clock images/s and CPU s per image; on a machine shared with
other jobs, wall time swings with their load while CPU time counts only this process's work).
Batch size 1 is one pipeline call per triple, as evaluation drew before batching.

    python benchmarks/batched_generation.py                       # 32 triples, 20 steps, 3 rounds
    python benchmarks/batched_generation.py --batch-sizes 1 16 --threads 1 2 --count 48
"""
import argparse, json, os, platform, time
from pathlib import Path

import torch

from anime_pose.core import bundled_path
from anime_pose.demo import load_recipe
from anime_pose.evaluate import generation_speed, held_out_triples, speed_table
from anime_pose.pipeline import PoseTransferPipeline
from anime_pose.train import TrainConfig, override_config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--count', type=int, default=32, help='held-out triples drawn per setting')
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8, 16, 32])
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--out', default='benchmarks/results/batched_generation.md')
    args = parser.parse_args()
    config = override_config(TrainConfig(), load_recipe()['anime_pose']['config'], 'recipe anime_pose')
    triples = list(held_out_triples(config, args.count))
    pipe = PoseTransferPipeline.from_pretrained(bundled_path('model'))
    start, load = time.perf_counter(), os.getloadavg()[0]
    rows = generation_speed(pipe, triples, args.batch_sizes, args.threads, args.rounds, args.steps)
    table = speed_table(rows)
    where = (f"{len(triples)} held-out triples of the demo, {args.steps} steps, the bundled model "
             f"(guidance {pipe.config.guidance_scale:g}, ControlNet scale {pipe.config.controlnet_conditioning_scale:g}); "
             f"medians of {args.rounds} interleaved rounds; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, load average before {load:.2f} and after {os.getloadavg()[0]:.2f}; {time.perf_counter() - start:.0f} s")
    print(table); print(where)
    Path(args.out).write_text(f'# Batched against one-at-a-time generation\n\n{table}\n\n{where}\n\n'
                              f'```json\n{json.dumps(rows, indent=1)}\n```\n')


if __name__ == '__main__':
    main()

"""Latency of a pose transfer vs plain `StableDiffusionControlNetPipeline` on the same tiny components.

Both pipelines get the same components, prompt, skeleton, size, steps, guidance and seed; the pose
transfer additionally encodes the reference with the VAE, runs the one clean reference pass and
attends to the cached reference tokens at every step. The two are run alternately `--repeats`
times after a warm-up, and each one's fastest run is kept (other processes on a shared machine
only ever add time), so the ratio is measured in one run of this script on one machine. The
process's CPU time is recorded too: on a machine shared with other jobs, wall time swings with
their load while CPU time counts only this process's own work.

    python benchmarks/pipeline_latency.py                     # 20 steps, 64 px, 5 rounds
    python benchmarks/pipeline_latency.py --size 128 --steps 20 --out benchmarks/results/pipeline_latency_128.json
"""
import argparse, json, platform, statistics, time
from pathlib import Path

import torch
from diffusers import StableDiffusionControlNetPipeline
from PIL import Image

from anime_pose.pipeline import PoseTransferPipeline
from anime_pose.tiny import tiny_components
from anime_pose.pose import pose_from_joints

STANDING = {'nose': (32, 10), 'neck': (32, 18), 'right_shoulder': (26, 18), 'right_elbow': (22, 28), 'right_wrist': (20, 38),
            'left_shoulder': (38, 18), 'left_elbow': (42, 28), 'left_wrist': (44, 38), 'right_hip': (28, 36), 'right_knee': (28, 46),
            'right_ankle': (28, 58), 'left_hip': (36, 36), 'left_knee': (36, 46), 'left_ankle': (36, 58)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--size', type=int, default=64, help='image side in pixels')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--guidance', type=float, default=5.0)
    parser.add_argument('--out', default='benchmarks/results/pipeline_latency.json')
    args = parser.parse_args()

    components = tiny_components(seed=0)
    transfer = PoseTransferPipeline(**components)
    stock = StableDiffusionControlNetPipeline(**{k: v for k, v in components.items() if k != 'reference_net'},
                                              safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for pipe in (transfer, stock): pipe.set_progress_bar_config(disable=True)
    skeleton = pose_from_joints(STANDING, 64, 64).skeleton_image(args.size, args.size)
    reference = Image.new('RGB', (args.size, args.size), (250, 240, 230))
    common = dict(prompt='1girl, solo, long hair', negative_prompt='lowres', num_inference_steps=args.steps,
                  guidance_scale=args.guidance, height=args.size, width=args.size)

    def run_transfer():
        transfer(reference, skeleton, generator=torch.Generator().manual_seed(0), **common)

    def run_stock():
        stock(image=skeleton, generator=torch.Generator().manual_seed(0), **common)

    times = {'pose_transfer': [], 'stock_controlnet': []}
    cpu = {'pose_transfer': [], 'stock_controlnet': []}
    with torch.no_grad():
        run_transfer(); run_stock()  # warm-up
        for _ in range(args.repeats):
            for name, fn in (('stock_controlnet', run_stock), ('pose_transfer', run_transfer)):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - start); cpu[name].append(time.process_time() - start_cpu)
    best = {name: min(values) for name, values in times.items()}
    result = dict(steps=args.steps, size=args.size, guidance=args.guidance, repeats=args.repeats, threads=torch.get_num_threads(),
                  machine=f'{platform.machine()} {platform.processor() or ""}'.strip(), torch=torch.__version__,
                  seconds_min=best, seconds_median={name: statistics.median(values) for name, values in times.items()},
                  ratio_min=best['pose_transfer'] / best['stock_controlnet'],
                  ratio_median=statistics.median(times['pose_transfer']) / statistics.median(times['stock_controlnet']),
                  cpu_seconds_median={name: statistics.median(values) for name, values in cpu.items()},
                  cpu_ratio_median=statistics.median(cpu['pose_transfer']) / statistics.median(cpu['stock_controlnet']))
    print(f"{args.steps} steps, {args.size}x{args.size}, guidance {args.guidance}, {args.repeats} alternating rounds, {torch.get_num_threads()} threads")
    print(f"stock StableDiffusionControlNetPipeline: {best['stock_controlnet']:.3f} s (fastest), {result['seconds_median']['stock_controlnet']:.3f} s (median)")
    print(f"PoseTransferPipeline:                    {best['pose_transfer']:.3f} s (fastest), {result['seconds_median']['pose_transfer']:.3f} s (median)")
    print(f"ratio: {result['ratio_min']:.3f}x (fastest), {result['ratio_median']:.3f}x (median); goal <= 1.1x (issue 21)")
    print(f"CPU time (median): stock {result['cpu_seconds_median']['stock_controlnet']:.3f} s, pose transfer "
          f"{result['cpu_seconds_median']['pose_transfer']:.3f} s, ratio {result['cpu_ratio_median']:.3f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + '\n')


if __name__ == '__main__': main()

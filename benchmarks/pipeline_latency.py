"""Latency of a pose transfer vs plain `StableDiffusionControlNetPipeline` on components of the same shapes.

Both pipelines get components of the same shapes (by default the bundled model's, `small`), the same
prompt, skeleton, size, steps, guidance and seed. The pose transfer is the shipped design: a
reference net, reference attention, and a UNet and ControlNet that also read A warped onto pose B
(four more input channels). So it additionally encodes the reference with the VAE, runs the one
clean reference pass, warps A onto pose B and encodes the warp, and attends to the cached
reference tokens at every step. It is timed twice: with A's pose given (`--reference-pose`), and
with A's pose found in the reference by the bundled detector (what a call without it pays). The two are run alternately `--repeats`
times after a warm-up, and each one's fastest run is kept (other processes on a shared machine
only ever add time), so the ratio is measured in one run of this script on one machine. The
process's CPU time is recorded too: on a machine shared with other jobs, wall time swings with
their load while CPU time counts only this process's own work. It also reports the ratio of each
round's pair (median), the milliseconds a transfer spends in each stage, and one guided denoising
step alone: stock shapes, with the warp's input channels, and with reference attention too.

    python benchmarks/pipeline_latency.py                     # the bundled shapes, 20 steps, 64 px, 5 rounds
    python benchmarks/pipeline_latency.py --size 128 --steps 20 --out benchmarks/results/pipeline_latency_128.json
"""
import argparse, json, platform, statistics, time
from pathlib import Path

import torch
from diffusers import StableDiffusionControlNetPipeline
from PIL import Image, ImageDraw

from anime_pose.pipeline import PoseTransferPipeline
from anime_pose.tiny import TINY_SHAPES, tiny_components
from anime_pose.pose import pose_from_joints

STANDING = {'nose': (32, 10), 'neck': (32, 18), 'right_shoulder': (26, 18), 'right_elbow': (22, 28), 'right_wrist': (20, 38),
            'left_shoulder': (38, 18), 'left_elbow': (42, 28), 'left_wrist': (44, 38), 'right_hip': (28, 36), 'right_knee': (28, 46),
            'right_ankle': (28, 58), 'left_hip': (36, 36), 'left_knee': (36, 46), 'left_ankle': (36, 58)}


STAGES = ('poses_and_skeletons', 'prompt_text', 'warp_reference', 'encode_images', 'decode_latents')  # functions of anime_pose.pipeline


def stage_times(transfer: PoseTransferPipeline, run, repeats: int) -> dict[str, float]:
    "Milliseconds one call of `run` spends in each stage (median over `repeats` calls), timed by wrapping the stages' functions."
    import anime_pose.pipeline as module
    spent, originals = {}, {}
    def timed(label, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try: return fn(*args, **kwargs)
            finally: spent[label] = spent.get(label, 0.0) + time.perf_counter() - start
        return wrapper
    targets = [(module, name, name) for name in STAGES] + [(module.ReferenceAttention, 'write', 'reference_pass'),
                                                           (transfer, '_denoise', 'denoising_steps')]
    for owner, name, label in targets: originals[owner, name] = getattr(owner, name)
    per_call = {label: [] for *_, label in targets}
    per_call['total'] = []
    try:
        for owner, name, label in targets: setattr(owner, name, timed(label, originals[owner, name]))
        for _ in range(repeats):
            spent.clear()
            start = time.perf_counter()
            run()
            per_call['total'].append(time.perf_counter() - start)
            for *_, label in targets: per_call[label].append(spent.get(label, 0.0))
    finally:
        for (owner, name), fn in originals.items():
            if owner is transfer: delattr(owner, name)  # back to the class's method
            else: setattr(owner, name, fn)
    return {label: 1e3 * statistics.median(values) for label, values in per_call.items()}


def step_times(components: dict, plain: dict, size: int, repeats: int = 60) -> dict[str, float]:
    """Milliseconds of one guided denoising step (UNet + ControlNet on a doubled batch), median of `repeats` rounds taken in
    turn: the stock shapes; the shipped UNet and ControlNet (4 more input channels, for the warp) without reading the
    reference; and with reference attention reading it."""
    from anime_pose.controlnet import controlled_prediction, downsampling
    from anime_pose.reference import ReferenceAttention
    unet, factor = components['unet'], downsampling(components['vae'].config.block_out_channels)
    side, generator = size // factor, torch.Generator().manual_seed(0)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    condition = torch.rand(2, 3, size, size, generator=generator)
    latents = torch.randn(2, unet.config.in_channels, side, side, generator=generator)
    plain_latents = latents[:, :plain['unet'].config.in_channels]
    reference = ReferenceAttention(unet, components['reference_net'])
    def read():
        with reference.read(): controlled_prediction(unet, components['controlnet'], latents, 500, text, condition)
    steps = {'stock': lambda: controlled_prediction(plain['unet'], plain['controlnet'], plain_latents, 500, text, condition),
             'warp_channels': lambda: controlled_prediction(unet, components['controlnet'], latents, 500, text, condition),
             'warp_channels_and_reference_attention': read}
    times = {name: [] for name in steps}
    with torch.no_grad(), reference:
        reference.write(torch.randn(1, components['vae'].config.latent_channels, side, side, generator=generator), text[1:])
        for step in steps.values(): step()
        for _ in range(repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--size', type=int, default=64, help='image side in pixels')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--guidance', type=float, default=5.0)
    parser.add_argument('--shape', default='small', choices=list(TINY_SHAPES), help="components' shapes (default small: the bundled model's)")
    parser.add_argument('--out', default='benchmarks/results/pipeline_latency.json')
    args = parser.parse_args()

    components = tiny_components(seed=0, shape=args.shape, reference_net=True, warped_reference=True)
    plain = tiny_components(seed=0, shape=args.shape)  # the same shapes, 4 input channels: what the stock pipeline takes
    transfer = PoseTransferPipeline(**components)
    stock = StableDiffusionControlNetPipeline(**{k: v for k, v in plain.items() if k != 'reference_net'},
                                              safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for pipe in (transfer, stock): pipe.set_progress_bar_config(disable=True)
    pose = pose_from_joints(STANDING, 64, 64)
    skeleton = pose.skeleton_image(args.size, args.size)
    reference = Image.new('RGB', (args.size, args.size), (250, 240, 230))
    ImageDraw.Draw(reference).rectangle([args.size * 3 // 8, args.size // 8, args.size * 5 // 8, args.size * 7 // 8],
                                        fill=(200, 60, 90))  # something to cut up and warp
    common = dict(prompt='1girl, solo, long hair', negative_prompt='lowres', num_inference_steps=args.steps,
                  guidance_scale=args.guidance, height=args.size, width=args.size)
    runs = {'stock_controlnet': lambda: stock(image=skeleton, generator=torch.Generator().manual_seed(0), **common),
            'pose_transfer': lambda: transfer(reference, skeleton, reference_pose=pose.resized(args.size, args.size),
                                              generator=torch.Generator().manual_seed(0), **common),
            'pose_transfer_detected': lambda: transfer(reference, skeleton, generator=torch.Generator().manual_seed(0),
                                                       **common)}
    times, cpu = {name: [] for name in runs}, {name: [] for name in runs}
    with torch.no_grad():
        for fn in runs.values(): fn()  # warm-up (and the detector loaded)
        for _ in range(args.repeats):
            for name, fn in runs.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - start); cpu[name].append(time.process_time() - start_cpu)
        stages = stage_times(transfer, runs['pose_transfer'], args.repeats)
    steps = step_times(components, plain, args.size)
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpu.items()}
    result = dict(steps=args.steps, size=args.size, shape=args.shape, guidance=args.guidance, repeats=args.repeats,
                  threads=torch.get_num_threads(),
                  machine=f'{platform.machine()} {platform.processor() or ""}'.strip(), torch=torch.__version__,
                  seconds_min=best, seconds_median=median,
                  ratio_min={name: best[name] / best['stock_controlnet'] for name in runs if name != 'stock_controlnet'},
                  ratio_median={name: median[name] / median['stock_controlnet'] for name in runs if name != 'stock_controlnet'},
                  ratio_of_pairs_median={name: statistics.median(t / s for t, s in zip(times[name], times['stock_controlnet']))
                                         for name in runs if name != 'stock_controlnet'},
                  cpu_seconds_median=cpu_median,
                  pose_transfer_stages_ms=stages, guided_step_ms=steps,
                  cpu_ratio_median={name: cpu_median[name] / cpu_median['stock_controlnet'] for name in runs
                                    if name != 'stock_controlnet'})
    print(f"{args.shape} shapes, {args.steps} steps, {args.size}x{args.size}, guidance {args.guidance}, {args.repeats} "
          f"interleaved rounds, {torch.get_num_threads()} threads")
    for name in runs:
        ratio = '' if name == 'stock_controlnet' else (f"; ratio {result['ratio_min'][name]:.3f}x (fastest), "
                                                       f"{result['ratio_median'][name]:.3f}x (median), "
                                                       f"CPU {result['cpu_ratio_median'][name]:.3f}x")
        print(f"{name:24s} {best[name]:.3f} s (fastest), {median[name]:.3f} s (median), CPU {cpu_median[name]:.3f} s{ratio}")
    print('ratio of each round\'s pair, median: ' + ', '.join(f'{name} {ratio:.3f}x' for name, ratio in
                                                            result['ratio_of_pairs_median'].items()))
    print('pose transfer by stage (ms, median over the rounds): ' + ', '.join(f'{k} {v:.1f}' for k, v in stages.items()))
    print('one guided step (ms, median): ' + ', '.join(f'{k} {v:.2f}' for k, v in steps.items()))
    print('goal: pose transfer <= 1.1x the stock pipeline (issue 21)')
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + '\n')


if __name__ == '__main__': main()

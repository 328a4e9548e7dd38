"""The memory plan and the transfer latency checked on a GPU (or, with --cpu --small, at small shapes on the CPU).

1. Training memory: for SD 1.5- and SD 2.1-shaped components with random weights built from their
   configurations (no download), real training steps of `DiffusionMethod._loss` (forward, backward,
   clipping, AdamW step) at 512 px, fp16 and bf16, with and without gradient checkpointing; the
   peak `torch.cuda.max_memory_allocated` against `anime_pose.plan.estimate_memory`'s plan.
   Trained: the preset's ControlNet + rank-16 reference LoRA, and (SD 1.5) also + a rank-16 UNet LoRA.
2. Transfer latency at 512 px: `PoseTransferPipeline` against the stock `StableDiffusionControlNetPipeline`
   on the same SD 1.5-shaped components, calls interleaved, medians (goal <= 1.1x).

    bash benchmarks/gpu_check.sh                 # on a CUDA machine, <= 8 minutes on one H100/H200
    python benchmarks/gpu_check.py --cpu --small # the same checks at small shapes on the CPU
"""
import argparse, gc, json, platform, statistics, sys, time
from pathlib import Path

import torch

SMALL = dict(shapes=('sd15-mini', 'sd21-mini'), size=128, steps=4, repeats=3)
FULL = dict(shapes=('sd15', 'sd21'), size=512, steps=20, repeats=5)


def memory_cases(shapes, device_type):
    "(shape, precision, checkpointing, trained name, trained parts or None) to measure."
    precisions = ('fp16', 'bf16') if device_type == 'cuda' else ('bf16',)  # CPU autocast: bf16
    cases = [(shape, p, c, 'ControlNet + reference LoRA 16', None)
             for shape in shapes for p in precisions for c in (True, False)]
    cases += [(shapes[0], precisions[0], c, '+ UNet LoRA 16', {'controlnet': 0, 'reference_net': 16, 'unet': 16})
              for c in (True, False)]
    return cases


def check_memory(args, settings, device):
    from anime_pose.plan import GiB, estimate_memory, measure_peak
    from anime_pose.train import TrainConfig
    rows = []
    for shape, precision, checkpointing, name, trained in memory_cases(settings['shapes'], device.type):
        config = TrainConfig(base_model=shape, resolution=settings['size'], batch_size=1, gradient_accumulation=4,
                             mixed_precision=precision, gradient_checkpointing=checkpointing, optimizer='adamw',
                             reference_lora_rank=16, min_snr_gamma=5.0)
        planned = estimate_memory(config, trained, device_type=device.type)['peak']
        start = time.perf_counter()
        measured = measure_peak(config, trained, device=str(device), steps=2)
        row = dict(shape=shape, size=settings['size'], precision=precision, checkpointing=checkpointing, trained=name,
                   planned_gib=planned / GiB, measured_gib=measured / GiB, ratio=planned / measured,
                   seconds=time.perf_counter() - start)
        if device.type == 'cuda':
            row['reserved_gib'] = torch.cuda.max_memory_reserved() / GiB
        rows.append(row)
        print(f"{shape:>9} {settings['size']} px {precision} checkpointing {'on ' if checkpointing else 'off'} {name:<32} "
              f"planned {row['planned_gib']:7.3f} GiB measured {row['measured_gib']:7.3f} GiB "
              f"ratio {row['ratio']:.3f} ({row['seconds']:.0f} s)", flush=True)
        gc.collect()
        if device.type == 'cuda': torch.cuda.empty_cache()
    return rows


def check_latency(args, settings, device):
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image
    from anime_pose.pipeline import PoseTransferPipeline
    from anime_pose.plan import build_components
    from anime_pose.pose import pose_from_joints
    from anime_pose.tiny import sd_scheduler, tiny_tokenizer
    from anime_pose.train import TrainConfig
    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline_latency import STANDING
    size, dtype = settings['size'], torch.float16 if device.type == 'cuda' else torch.float32
    parts = build_components(TrainConfig(base_model=settings['shapes'][0], train_reference=False), device)
    parts = {k: v.to(dtype).eval() for k, v in parts.items()}
    components = dict(parts, tokenizer=tiny_tokenizer(), scheduler=sd_scheduler())
    transfer = PoseTransferPipeline(**components, reference_net=None)
    stock = StableDiffusionControlNetPipeline(**components, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    for pipe in (transfer, stock): pipe.set_progress_bar_config(disable=True)
    skeleton = pose_from_joints(STANDING, 64, 64).skeleton_image(size, size)
    reference = Image.new('RGB', (size, size), (250, 240, 230))
    common = dict(prompt='1girl, solo, long hair', negative_prompt='lowres', num_inference_steps=settings['steps'],
                  guidance_scale=5.0, height=size, width=size)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    def clock(fn):
        sync(); start = time.perf_counter(); fn(); sync()
        return time.perf_counter() - start
    runs = {'pose_transfer': lambda: transfer(reference, skeleton, generator=torch.Generator().manual_seed(0), **common),
            'stock_controlnet': lambda: stock(image=skeleton, generator=torch.Generator().manual_seed(0), **common)}
    times = {name: [] for name in runs}
    with torch.no_grad():
        for fn in runs.values(): fn()  # warm-up
        for _ in range(settings['repeats']):
            for name, fn in runs.items(): times[name].append(clock(fn))
    median = {name: statistics.median(t) for name, t in times.items()}
    result = dict(shape=settings['shapes'][0], size=size, steps=settings['steps'], repeats=settings['repeats'],
                  dtype=str(dtype), seconds_median=median, seconds=times,
                  ratio_median=median['pose_transfer'] / median['stock_controlnet'])
    print(f"latency {settings['shapes'][0]} {size} px, {settings['steps']} steps, {settings['repeats']} interleaved rounds: "
          f"stock {median['stock_controlnet']:.3f} s, pose transfer {median['pose_transfer']:.3f} s (medians), "
          f"ratio {result['ratio_median']:.3f}x (goal <= 1.1x)", flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--cpu', action='store_true', help='run on the CPU (no GPU needed)')
    parser.add_argument('--small', action='store_true', help='SD layouts at a tenth of the widths, 128 px, few steps')
    parser.add_argument('--out', help='write the results as JSON here')
    parser.add_argument('--skip-latency', action='store_true')
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print('gpu_check: no CUDA device here; run with --cpu --small to check the script on the CPU', file=sys.stderr)
        return 1
    if args.out and Path(args.out).exists():
        print(f"gpu_check: '{args.out}' exists; give another --out (nothing was run)", file=sys.stderr)
        return 1
    device = torch.device('cpu' if args.cpu else 'cuda')
    if device.type == 'cpu': torch.set_num_threads(1)
    settings = SMALL if args.small else FULL
    name = torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU {platform.machine()}'
    print(f"gpu_check on {name}, torch {torch.__version__}", flush=True)
    result = dict(device=name, torch=torch.__version__, settings=settings)
    result['memory'] = check_memory(args, settings, device)
    if not args.skip_latency: result['latency'] = check_latency(args, settings, device)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + '\n')
    return 0


if __name__ == '__main__': sys.exit(main())

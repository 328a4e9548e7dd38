"""Training steps per second on the CPU-sized models: this project's loop (cached latents and text embeddings) against a
faithful re-implementation of the step of diffusers' examples/controlnet/train_controlnet.py (VAE and text encoder
every step), plus the cost of building the caches; `--end-to-end` also times `anime-pose train --config tiny`.
`--base small` (the default: the bundled model's shape, 4x VAE) writes results/train_speed.json; `--base tiny`
(8x VAE, the tests' shape) writes results/train_speed_tiny.json.

    python benchmarks/train_speed.py [--base small|tiny] [--steps 20] [--batch-size 4] [--end-to-end] [--flops]
"""
import argparse, json, shutil, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def diffusers_reference_steps(components: dict, triples, steps: int, batch_size: int, resolution: int, seed: int = 0) -> float:
    "Steps/s of train_controlnet.py's loop body: dataloader with image transforms, VAE + text encoder + ControlNet + UNet every step."
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from torchvision import transforms
    from anime_pose.pose import Pose
    torch.manual_seed(seed)
    accelerator = Accelerator()
    vae, text_encoder, tokenizer, unet = components['vae'], components['text_encoder'], components['tokenizer'], components['unet']
    controlnet = components['controlnet']
    noise_scheduler = DDPMScheduler.from_config(components['scheduler'].config)
    vae.requires_grad_(False); unet.requires_grad_(False); text_encoder.requires_grad_(False); controlnet.train()
    # the script's dataset: image, conditioning image and caption columns, transformed on access (with_transform)
    conditioning = [Pose(np.asarray(k, np.float32), resolution, resolution).skeleton_image(resolution, resolution) for k in triples['pose']]
    image_transforms = transforms.Compose([transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
                                          transforms.CenterCrop(resolution), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    conditioning_transforms = transforms.Compose([transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
                                                 transforms.CenterCrop(resolution), transforms.ToTensor()])
    class Dataset(torch.utils.data.Dataset):
        def __len__(self): return len(triples)
        def __getitem__(self, i):
            row = triples[i]
            caption = ', '.join(t.replace('_', ' ') for t in row['tags'])
            ids = tokenizer(caption, max_length=tokenizer.model_max_length, padding='max_length', truncation=True, return_tensors='pt').input_ids[0]
            return dict(pixel_values=image_transforms(row['target'].convert('RGB')),
                        conditioning_pixel_values=conditioning_transforms(conditioning[i].convert('RGB')), input_ids=ids)
    def collate_fn(examples):
        return {k: torch.stack([e[k] for e in examples]).contiguous() for k in examples[0]}
    dataloader = torch.utils.data.DataLoader(Dataset(), shuffle=True, collate_fn=collate_fn, batch_size=batch_size, num_workers=0)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler('constant', optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)
    controlnet, optimizer, dataloader, lr_scheduler = accelerator.prepare(controlnet, optimizer, dataloader, lr_scheduler)
    weight_dtype = torch.float32
    vae.to(accelerator.device, dtype=weight_dtype); unet.to(accelerator.device, dtype=weight_dtype); text_encoder.to(accelerator.device, dtype=weight_dtype)

    def batches():
        while True: yield from dataloader
    done, started = 0, None
    for batch in batches():
        if done == 2: started = time.perf_counter()  # two warm-up steps
        if done == steps + 2: break
        with accelerator.accumulate(controlnet):
            latents = vae.encode(batch['pixel_values'].to(dtype=weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
            noisy_latents = noise_scheduler.add_noise(latents.float(), noise.float(), timesteps).to(dtype=weight_dtype)
            encoder_hidden_states = text_encoder(batch['input_ids'], return_dict=False)[0]
            controlnet_image = batch['conditioning_pixel_values'].to(dtype=weight_dtype)
            down_block_res_samples, mid_block_res_sample = controlnet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                                                      controlnet_cond=controlnet_image, return_dict=False)
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                              down_block_additional_residuals=[s.to(dtype=weight_dtype) for s in down_block_res_samples],
                              mid_block_additional_residual=mid_block_res_sample.to(dtype=weight_dtype), return_dict=False)[0]
            target = noise if noise_scheduler.config.prediction_type == 'epsilon' else noise_scheduler.get_velocity(latents, noise, timesteps)
            loss = F.mse_loss(model_pred.float(), target.float(), reduction='mean')
            accelerator.backward(loss)
            if accelerator.sync_gradients: accelerator.clip_grad_norm_(controlnet.parameters(), 1.0)
            optimizer.step(); lr_scheduler.step(); optimizer.zero_grad(set_to_none=False)
        done += 1
    return steps / (time.perf_counter() - started)


def our_steps(out: Path, steps: int, batch_size: int, **overrides) -> dict:
    "Steps/s of `anime_pose.train.train` on a CPU-sized base (`base_model` in overrides), and the seconds spent building the caches."
    from anime_pose.finetune import DiffusionMethod
    from anime_pose.train import load_config, override_config, train
    config = override_config(load_config('tiny'), dict(max_steps=steps + 2, batch_size=batch_size, base_steps=0, validate_every=0,
                                                        sample_every=0, checkpoint_every=0, synthetic_characters=8, **overrides))
    clock = {}
    class Timed(DiffusionMethod):
        def _cached(self, out):
            start = time.perf_counter(); caches = super()._cached(out); clock['cache_seconds'] = time.perf_counter() - start
            return caches
        def training_step(self, batch):
            self.calls = getattr(self, 'calls', 0) + 1
            if self.calls == 3: clock['start'] = time.perf_counter()  # after two warm-up steps
            return super().training_step(batch)
    train(config, out, method=Timed, progress=False)
    return dict(steps_per_second=steps / (time.perf_counter() - clock['start']), cache_seconds=clock.get('cache_seconds'))


def flop_ratio(base: str = 'sd15', resolution: int = 512, gradient_checkpointing: bool = False) -> dict:
    "Compute per step at full size, counted on the meta device: VAE encode + text encoder + ControlNet/UNet training pass vs the latter alone."
    from torch.utils.flop_counter import FlopCounterMode
    from anime_pose.plan import meta_components
    from anime_pose.train import load_config, override_config
    config = override_config(load_config(base), dict(train_reference=False, resolution=resolution))
    c = meta_components(config)
    unet, vae, text_encoder, controlnet = c['unet'], c['vae'], c['text_encoder'], c['controlnet']
    controlnet.train(); unet.requires_grad_(False).train()
    if gradient_checkpointing: controlnet.enable_gradient_checkpointing(); unet.enable_gradient_checkpointing()
    meta = dict(device='meta')
    pixels, ids = torch.empty(1, 3, resolution, resolution, **meta), torch.zeros(1, 77, dtype=torch.long, **meta)
    latents, condition = torch.empty(1, 4, resolution // 8, resolution // 8, **meta), torch.empty(1, 3, resolution, resolution, **meta)
    text, t = torch.empty(1, 77, unet.config.cross_attention_dim, **meta), torch.zeros(1, dtype=torch.long, **meta)
    def count(fn):
        with FlopCounterMode(display=False) as counter: fn()
        return counter.get_total_flops()
    def denoise():
        down, mid = controlnet(latents, t, encoder_hidden_states=text, controlnet_cond=condition, return_dict=False)
        unet(latents, t, encoder_hidden_states=text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample.float().mean().backward()
    with torch.no_grad(): frozen = count(lambda: vae.encode(pixels).latent_dist.sample()) + count(lambda: text_encoder(ids))
    trained = count(denoise)
    return dict(frozen_tflop=frozen / 1e12, training_pass_tflop=trained / 1e12, ratio=(frozen + trained) / trained)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--base', default='small', choices=('tiny', 'small'),
                        help="CPU-sized shape: 'small' (4x VAE, the bundled model's) or 'tiny' (8x VAE, the tests')")
    parser.add_argument('--threads', type=int, default=1, help='torch threads (1 avoids oversubscription on a shared 2-core machine)')
    parser.add_argument('--end-to-end', action='store_true', help='also time `anime-pose train --config tiny` from nothing')
    parser.add_argument('--flops', action='store_true', help='also count the compute per step at SD 1.x size, 512 px (meta device)')
    parser.add_argument('--no-speed', dest='speed', action='store_false', help='skip the steps/s comparison')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from anime_pose.tiny import tiny_components
    from anime_pose.train import load_config, override_config, training_triples
    scratch = Path(tempfile.mkdtemp(prefix='train_speed.'))
    results = {}
    try:
        if args.speed:
            base = dict(base_model=args.base)
            ours = our_steps(scratch / 'ours', args.steps, args.batch_size, train_reference=False, use_reference=False, **base)
            triples = training_triples(override_config(load_config('tiny'), dict(synthetic_characters=8)))['train']
            reference = diffusers_reference_steps(tiny_components(0, shape=args.base), triples, args.steps, args.batch_size, 64)
            with_reference = our_steps(scratch / 'ours_ref', args.steps, args.batch_size, **base)
            with_reference_uncached = our_steps(scratch / 'ours_ref_uncached', args.steps, args.batch_size, cache=False, **base)
            uncached = our_steps(scratch / 'ours_uncached', args.steps, args.batch_size, train_reference=False, use_reference=False, cache=False, **base)
            results.update(base=args.base, steps=args.steps, batch_size=args.batch_size, threads=args.threads,
                           ours_controlnet_cached=ours['steps_per_second'], cache_build_seconds=ours['cache_seconds'],
                           ours_controlnet_uncached=uncached['steps_per_second'],
                           diffusers_train_controlnet=reference, ratio_cached_vs_diffusers=ours['steps_per_second'] / reference,
                           ours_controlnet_and_reference_cached=with_reference['steps_per_second'],
                           ours_controlnet_and_reference_uncached=with_reference_uncached['steps_per_second'])
            print(f"diffusers train_controlnet.py step (VAE + text encoder every step): {reference:.2f} steps/s")
            print(f"this loop, ControlNet only, cached:                                 {ours['steps_per_second']:.2f} steps/s "
                  f"(caches built in {ours['cache_seconds']:.1f} s)")
            print(f"this loop, ControlNet only, no cache:                               {uncached['steps_per_second']:.2f} steps/s")
            print(f"this loop, ControlNet + reference net, cached:                      {with_reference['steps_per_second']:.2f} steps/s")
            print(f"this loop, ControlNet + reference net, no cache:                    {with_reference_uncached['steps_per_second']:.2f} steps/s")
            print(f"ratio (this loop cached / diffusers): {ours['steps_per_second'] / reference:.2f}x")
        if args.flops:
            for checkpointing in (False, True):
                f = flop_ratio(gradient_checkpointing=checkpointing)
                results[f'sd15_512_flops{"_checkpointing" if checkpointing else ""}'] = f
                print(f"SD 1.x at 512 px{' with gradient checkpointing' if checkpointing else ''}: VAE + text encoder {f['frozen_tflop']:.2f} TFLOP, "
                      f"ControlNet/UNet training pass {f['training_pass_tflop']:.2f} TFLOP per sample: expected cache speed-up {f['ratio']:.2f}x")
        if args.end_to_end:
            out = scratch / 'tiny'
            start = time.perf_counter()
            subprocess.run([str(Path(sys.executable).parent / 'anime-pose'), 'train', '--config', 'tiny', '--out', str(out)], check=True)
            results['end_to_end_seconds'] = time.perf_counter() - start
            print(f"anime-pose train --config tiny, from nothing: {results['end_to_end_seconds']:.0f} s")
            shutil.copy(out / 'losses.csv', Path(__file__).parent / 'results' / 'train_tiny_losses.csv')
            samples = sorted((out / 'samples').glob('*.png'))
            if samples: shutil.copy(samples[-1], Path(__file__).parent / 'results' / 'train_tiny_samples.png')
    finally: shutil.rmtree(scratch, ignore_errors=True)
    path = Path(__file__).parent / 'results' / f'train_speed{"" if args.base == "small" else "_" + args.base}.json'
    path.parent.mkdir(exist_ok=True)
    previous = json.loads(path.read_text()) if path.exists() else {}  # keep figures this run did not measure (end to end, flops)
    path.write_text(json.dumps({**previous, **results}, indent=2) + '\n')


if __name__ == '__main__': main()

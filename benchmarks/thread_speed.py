"""One thread against two for the stages of `anime-pose demo --retrain` on the bundled (small) shapes: a step of the base
pre-training's VAE loop and of its UNet-and-text-encoder loop (`tiny._pretrain_vae`, `tiny._pretrain_unet`, run for a few
steps), and the VAE encoding 1,600 images in one batch or in batches of 64.
Each setting runs in its own process (torch's thread pool is set once per process), the two thread counts in turn.

    python benchmarks/thread_speed.py            # 20 VAE steps, 40 UNet steps per run
"""
import argparse, json, subprocess, sys, time
from pathlib import Path


def measure(threads: int, vae_steps: int, unet_steps: int) -> dict[str, float]:
    "Milliseconds per step of the base pre-training's own loops (and seconds per 1,600 encoded images) on `threads` threads."
    import torch
    from tqdm.auto import tqdm
    from anime_pose.tiny import _pretrain_unet, _pretrain_vae, noise_scheduler, tiny_components
    torch.set_num_threads(threads)
    parts = tiny_components(0, shape='small')
    vae, unet, text_encoder, tokenizer = parts['vae'], parts['unet'], parts['text_encoder'], parts['tokenizer']
    generator, bar = torch.Generator().manual_seed(0), tqdm(disable=True)
    images = torch.rand(8, 3, 64, 64, generator=generator) * 2 - 1  # one batch: the loop's closing encode stays small
    ids = torch.randint(0, tokenizer.vocab_size, (8, tokenizer.model_max_length), generator=generator)
    scheduler = noise_scheduler(parts['scheduler'])
    def train_vae(steps): return _pretrain_vae(vae.train().requires_grad_(True), images, steps, 8, generator, bar)
    latents = train_vae(3)  # warm-up; the latents the UNet learns from
    def train_unet(steps):  # (the loop freezes both when it ends)
        _pretrain_unet(unet.requires_grad_(True), text_encoder.requires_grad_(True), latents, ids, ids[:1], scheduler, steps,
                       8, generator, bar)
    train_unet(3)
    result = {}
    for name, steps, run in (('vae_step_ms', vae_steps, train_vae), ('unet_step_ms', unet_steps, train_unet)):
        start = time.perf_counter()
        run(steps)
        result[name] = 1e3 * (time.perf_counter() - start) / steps
    vae.eval()
    many = torch.rand(1600, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        for chunk in (1600, 64):
            start = time.perf_counter()
            torch.cat([vae.encode(part).latent_dist.mode() for part in many.split(chunk)])
            result[f'encode_1600_in_batches_of_{chunk}_s'] = time.perf_counter() - start
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--vae-steps', type=int, default=20)
    parser.add_argument('--unet-steps', type=int, default=40)
    parser.add_argument('--rounds', type=int, default=2, help='runs of each thread count, in turn')
    parser.add_argument('--worker', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker: return print(json.dumps(measure(args.worker, args.vae_steps, args.unet_steps)))
    runs = {1: [], 2: []}
    for _ in range(args.rounds):
        for threads in runs:
            done = subprocess.run([sys.executable, __file__, '--worker', str(threads), '--vae-steps', str(args.vae_steps),
                                   '--unet-steps', str(args.unet_steps)], capture_output=True, text=True, check=True)
            runs[threads].append(json.loads(done.stdout.strip().splitlines()[-1]))
    for threads, results in runs.items():
        print(f'{threads} thread(s): ' + '; '.join(f'{key} ' + ' / '.join(f'{r[key]:.2f}' for r in results) for key in results[0]))


if __name__ == '__main__':
    main()

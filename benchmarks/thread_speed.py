"""One thread against two for the stages of `anime-pose demo --retrain` on the bundled (small) shapes: a training step of
the base VAE, of the base UNet with its text encoder, and the VAE encoding 1,600 images in one batch or in batches of 64.
Each setting runs in its own process (torch's thread pool is set once per process), the two thread counts in turn.

    python benchmarks/thread_speed.py            # 20 VAE steps, 40 UNet steps per run
"""
import argparse, json, subprocess, sys, time
from pathlib import Path


def measure(threads: int, vae_steps: int, unet_steps: int) -> dict[str, float]:
    "Milliseconds per step (and seconds per 1,600 encoded images) on `threads` threads."
    import torch
    import torch.nn.functional as F
    from anime_pose.tiny import tiny_components
    torch.set_num_threads(threads)
    parts = tiny_components(0, shape='small')
    vae, unet, text_encoder = parts['vae'], parts['unet'], parts['text_encoder']
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 64, 64, generator=generator) * 2 - 1
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), 1e-3)
    def vae_step():  # as `tiny._pretrain_vae` trains it
        posterior = vae.encode(images).latent_dist
        loss = F.l1_loss(vae.decode(posterior.sample(generator)).sample, images) + 1e-6 * posterior.kl().mean()
        loss.backward(); optimizer.step(); optimizer.zero_grad()
    latents = torch.randn(8, 4, 16, 16, generator=generator)
    ids = torch.randint(0, parts['tokenizer'].vocab_size, (8, 77), generator=generator)
    unet.train(); text_encoder.train()
    unet_optimizer = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], 1e-3)
    def unet_step():  # as `tiny._pretrain_unet` trains them
        t = torch.randint(1000, (8,), generator=generator)
        prediction = unet(latents, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        F.mse_loss(prediction, latents).backward(); unet_optimizer.step(); unet_optimizer.zero_grad()
    result = {}
    for name, step, count in (('vae_step_ms', vae_step, vae_steps), ('unet_step_ms', unet_step, unet_steps)):
        for _ in range(3): step()
        start = time.perf_counter()
        for _ in range(count): step()
        result[name] = 1e3 * (time.perf_counter() - start) / count
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

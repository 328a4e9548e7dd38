"""The fine-tuning trials of nbs/08a_finetune.ipynb's eighth round, one command each: train a variant of the bundled
model's recipe from one base, then score it (or any model) on held-out triples.

    # once: the recipe's base (about 22 min on 2 cores), and a held-out set of another seed
    python benchmarks/finetune_trials.py base runs/trials/base
    anime-pose synth --out held7 --characters 500 --poses-per-character 4 --seed 7

    # a trial: the seventh round's fine-tuning (reference net on, 2,800 steps, every latent pixel alike) from that base,
    # changed as the flags say (about 17 min for 3,800 steps on one thread)
    python benchmarks/finetune_trials.py train runs/trials/noref --base runs/trials/base --steps 3800 --no-reference-net
    python benchmarks/finetune_trials.py train runs/trials/gate --base runs/trials/base --steps 3800 --no-reference-net --warp-below 500
    python benchmarks/finetune_trials.py train runs/trials/subject --base runs/trials/base --steps 4600 --no-reference-net --subject-weight 4

    # its score: 200 test triples at the bundled model's drawing settings (scale 2, guidance 2, noise 0.7, 20 DDIM steps)
    python benchmarks/finetune_trials.py score runs/trials/gate/final --data held7 --warp-below 500 --probe
    python benchmarks/finetune_trials.py score anime_pose/assets/model --data held7 --count 96 --eta 1 --steps 40
    python benchmarks/finetune_trials.py score anime_pose/assets/model --data held7 --eta 1 --eta-below 500 --steps 40

Trials (flags of `train`; `score` takes `--warp-below` too, since a model trained with it must be drawn with it):
  --no-reference-net   no reference net and no reference attention: the warp is the only reference path
  --warp-below TAU     the ControlNet reads the warp only at timesteps below TAU (zeros above): at high noise the
                       skeleton alone lays the figure out
  --subject-weight W   the denoising loss on the character's latent pixels W times the background's (TrainConfig's
                       subject_weight)
Sampling (flags of `score`): --eta (DDIM's eta), --eta-below TAU (eta only at timesteps below TAU, 0 above), --steps,
--scheduler (ddim, dpm, unipc, euler_a), --warp-guidance (the negative branch of classifier-free guidance also loses
the warp, so guidance amplifies A's warp as well as the tags).
Each run prints one line of metrics with bootstrap 95 % intervals (and the reference probe with --probe).
"""
from __future__ import annotations
import argparse, importlib.resources, json, shutil, sys
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, UniPCMultistepScheduler

from anime_pose.evaluate import evaluate_methods, pipeline_method, reference_probe, saved_triples
from anime_pose.finetune import DiffusionMethod, load_base
from anime_pose.parser import load_parser
from anime_pose.pipeline import PoseTransferPipeline
from anime_pose.synthetic import PART_LABELS
from anime_pose.train import TrainConfig, train

SCHEDULERS = dict(ddim=DDIMScheduler, dpm=DPMSolverMultistepScheduler, unipc=UniPCMultistepScheduler,
                  euler_a=EulerAncestralDiscreteScheduler)


def recipe_config(**changes) -> TrainConfig:
    "The bundled model's fine-tuning settings (anime_pose/assets/recipe.json), changed by `changes`."
    recipe = json.loads((importlib.resources.files('anime_pose') / 'assets' / 'recipe.json').read_text())
    return TrainConfig(**{**recipe['anime_pose']['config'], **changes})


def zero_warp_where(model, # a UNet or ControlNet reading the warp after the noisy latents (twice the latent channels)
                    zeroed, # f(sample, timestep) -> (n,) bool: the samples whose warp channels are zeroed
                   ):
    "Hook `model` so that it reads zeros for the warp of the samples `zeroed` names; returns the hook's handle."
    channels = model.config.in_channels // 2
    def hook(module, args, kwargs):
        sample, timestep = args[0], args[1]
        keep = 1 - zeroed(sample, timestep).to(sample.dtype).reshape(-1, 1, 1, 1)
        return (torch.cat([sample[:, :channels], sample[:, channels:] * keep], 1), timestep, *args[2:]), kwargs
    return model.register_forward_pre_hook(hook, with_kwargs=True)


def warp_at_or_above(tau: int):
    "`zeroed` for `zero_warp_where`: the samples at timesteps >= `tau` (the ControlNet then reads the warp only below)."
    return lambda sample, timestep: torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(len(sample)) >= tau


def negative_branch(sample, timestep):
    "`zeroed` for `zero_warp_where`: the first half of a guided batch (the pipeline puts the negative branch first)."
    return torch.arange(len(sample), device=sample.device) < len(sample) // 2


class StochasticBelow(DDIMScheduler):
    "DDIM whose eta applies only at timesteps below `below` (a class attribute); deterministic above."
    below = 1000
    def step(self, model_output, timestep, sample, eta=0.0, **kwargs):
        return super().step(model_output, timestep, sample, eta=eta if int(timestep) < self.below else 0.0, **kwargs)


def build_base(args):
    torch.set_num_threads(args.threads)
    load_base(recipe_config(), Path(args.out))
    print(f'base: {Path(args.out) / "base"}')


def train_trial(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # the seventh round's recipe (reference net on, every latent pixel alike) unless a flag says otherwise; the recipe
    # now bundled is `--no-reference-net --subject-weight 4 --steps 4200`
    changes = dict(max_steps=args.steps, use_reference=not args.no_reference_net, train_reference=not args.no_reference_net,
                   subject_weight=args.subject_weight)
    out = Path(args.out)
    if out.exists(): sys.exit(f'{out} exists: give a new directory')
    out.mkdir(parents=True)
    shutil.copytree(Path(args.base) / 'base', out / 'base')  # the base is loaded from the run's own base/
    class Trial(DiffusionMethod):
        def build(self):
            super().build()
            if args.warp_below is not None: zero_warp_where(self.controlnet, warp_at_or_above(args.warp_below))
    summary = train(recipe_config(**changes), out, method=Trial)
    print({k: v for k, v in summary.items() if k != 'final'}, summary['final'])


def score(args):
    torch.set_num_threads(args.threads)
    pipe = PoseTransferPipeline.from_pretrained(args.model)
    if args.warp_below is not None: zero_warp_where(pipe.controlnet, warp_at_or_above(args.warp_below))
    guidance = [zero_warp_where(model, negative_branch) for model in (pipe.unet, pipe.controlnet)] if args.warp_guidance else []
    scheduler = SCHEDULERS[args.scheduler]
    if args.eta_below is not None: scheduler = type('StochasticBelow', (StochasticBelow,), {'below': args.eta_below})
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    call = PoseTransferPipeline.__call__
    PoseTransferPipeline.__call__ = lambda self, *a, **k: call(self, *a, **{**k, 'eta': args.eta})
    rows = list(saved_triples(args.data, 'test', args.count))
    method = pipeline_method(pipe, guidance_scale=args.guidance, controlnet_conditioning_scale=args.scale,
                             noise_scale=args.noise, num_inference_steps=args.steps, batch_size=16)
    m = evaluate_methods({'m': method}, rows, load_parser(None), PART_LABELS, progress=False, intervals=True)[0]['m']
    print(f"{args.model} ({len(rows)} triples): identity {m['identity_error']:.2f} [{m['identity_error_low']:.2f}, "
          f"{m['identity_error_high']:.2f}], parts {m['identity_parts_error']:.2f}, PCK {m['pck']:.3f} [{m['pck_low']:.3f}, "
          f"{m['pck_high']:.3f}], OKS {m['oks']:.3f}, SSIM {m['ssim']:.3f}, PSNR {m['psnr']:.2f}", flush=True)
    for handle in guidance: handle.remove()  # the probe draws unguided
    if args.probe: print('probe (test eps-MSE):', {k: round(v, 4) for k, v in reference_probe(pipe, rows).items()})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    base = commands.add_parser('base', help="pre-train the recipe's base into OUT/base")
    base.add_argument('out')
    base.add_argument('--threads', type=int, default=2)
    trial = commands.add_parser('train', help="fine-tune the recipe from a base, changed as the flags say")
    trial.add_argument('out')
    trial.add_argument('--base', required=True, help='a directory holding base/ (from the base command)')
    trial.add_argument('--steps', type=int, default=2800)
    trial.add_argument('--no-reference-net', action='store_true')
    trial.add_argument('--warp-below', type=int)
    trial.add_argument('--subject-weight', type=float, default=1.0)
    trial.add_argument('--threads', type=int, default=1)
    scored = commands.add_parser('score', help='score a model on test triples')
    scored.add_argument('model')
    scored.add_argument('--data', required=True, help='a saved triples dataset (anime-pose synth --out DIR)')
    scored.add_argument('--count', type=int, default=200)
    scored.add_argument('--scale', type=float, default=2.0)
    scored.add_argument('--guidance', type=float, default=2.0)
    scored.add_argument('--noise', type=float, default=0.7)
    scored.add_argument('--steps', type=int, default=20)
    scored.add_argument('--scheduler', choices=sorted(SCHEDULERS), default='ddim')
    scored.add_argument('--eta', type=float, default=0.0)
    scored.add_argument('--eta-below', type=int)
    scored.add_argument('--warp-below', type=int)
    scored.add_argument('--warp-guidance', action='store_true')
    scored.add_argument('--probe', action='store_true')
    scored.add_argument('--threads', type=int, default=1)
    args = parser.parse_args(argv)
    dict(base=build_base, train=train_trial, score=score)[args.command](args)


if __name__ == '__main__':
    main()

"""Planned peak training memory (`anime-pose train --dry-run`) at 512 px for the sets of trained parts issue 22 weighs.

The same table as nbs/08c_plan.ipynb ("What fits a 16 GB GPU at 512 px"); a plan, not a measurement
(benchmarks/gpu_check.sh measures it on a GPU).

    python benchmarks/train_memory_plan.py          # SD 1.5 shapes
    python benchmarks/train_memory_plan.py sd21     # SD 2.1 shapes
"""
import sys, torch
from anime_pose.plan import GiB, estimate_memory, fits_16gb
from anime_pose.train import load_config, override_config

SETS = {  # name: (overrides of the preset, trained parts when no configuration field says it yet)
    'ControlNet only': (dict(train_reference=False), None),
    'ControlNet + reference LoRA 16 (preset)': ({}, None),
    'ControlNet + reference net': (dict(reference_lora_rank=0), None),
    '+ UNet (full)': (dict(reference_lora_rank=0, train_unet=True), None),
    '+ UNet LoRA 16': (dict(reference_lora_rank=0), {'controlnet': 0, 'reference_net': 0, 'unet': 16}),
    'ControlNet + reference LoRA 16 + UNet (full)': (dict(train_unet=True), None),
    'ControlNet + reference LoRA 16 + UNet LoRA 16': ({}, {'controlnet': 0, 'reference_net': 16, 'unet': 16}),
}
SETTINGS = [dict(gradient_checkpointing=c, mixed_precision=p, optimizer=o)
            for c, p, o in [(True, 'fp16', 'adamw8bit'), (True, 'fp16', 'adamw'), (True, 'bf16', 'adamw'),
                            (False, 'fp16', 'adamw'), (False, 'bf16', 'adamw8bit')]]

def main(base: str = 'sd15'):
    torch.set_num_threads(1)
    print(f'| trained ({base}, 512 px, batch 1, accumulation 4) | trainable (M) | checkpointing | precision | optimizer | '
          'activations + recomputed (GiB) | peak moment | planned peak (GiB) | 16 GB |\n|---|---|---|---|---|---|---|---|---|')
    for name, (overrides, trained) in SETS.items():
        for setting in SETTINGS:
            config = override_config(load_config(base), overrides | setting)
            e = estimate_memory(config, trained)
            m, moment = e['memory'], max(e['moments'], key=e['moments'].get)
            print(f"| {name} | {e['trainable_parameters'] / 1e6:.0f} | {'on' if config.gradient_checkpointing else 'off'} | "
                  f"{config.mixed_precision} | {config.optimizer} | {(m['activations'] + m['recomputation']) / GiB:.2f} | "
                  f"{moment} | {e['peak'] / GiB:.2f} | {'fits' if fits_16gb(e) else 'no'} |", flush=True)

if __name__ == '__main__': main(*sys.argv[1:])

"Estimated peak training memory (`anime-pose train --dry-run`) of SD 1.x settings at 512 px: which fit a 16 GB GPU."
import sys, torch
from anime_pose.plan import GiB, estimate_memory
from anime_pose.train import load_config, override_config

torch.set_num_threads(1)
ROWS = [  # (what, overrides of the sd15 preset)
    ('everything fp32, full reference net, AdamW', dict(mixed_precision='no', gradient_checkpointing=False, optimizer='adamw', reference_lora_rank=0)),
    ('fp16, full reference net, AdamW', dict(gradient_checkpointing=False, optimizer='adamw', reference_lora_rank=0)),
    ('fp16, checkpointing, full reference net, 8-bit AdamW', dict(reference_lora_rank=0)),
    ('fp16, no checkpointing, reference LoRA 16, AdamW', dict(gradient_checkpointing=False, optimizer='adamw')),
    ('fp16, checkpointing, reference LoRA 16, AdamW', dict(optimizer='adamw')),
    ('preset sd15: fp16, checkpointing, reference LoRA 16, 8-bit AdamW', {}),
    ('preset sd15 at batch 4', dict(batch_size=4, gradient_accumulation=1)),
    ('ControlNet only (no reference path), fp16, checkpointing, 8-bit AdamW', dict(train_reference=False)),
]

def main(base: str = 'sd15'):
    lines = [f'| settings ({base}, 512 px, batch 1 unless noted) | trainable (M) | weights+grads+optimizer (GiB) | activations (GiB) | peak (GiB) | 16 GB |',
             '|---|---|---|---|---|---|']
    for what, overrides in ROWS:
        config = override_config(load_config(base), overrides)
        e = estimate_memory(config)
        m = e['memory']
        state = (m['frozen_weights'] + m['trainable_weights'] + m['gradients'] + m['optimizer_state']) / GiB
        lines.append(f"| {what} | {e['trainable_parameters'] / 1e6:.0f} | {state:.2f} | {m['activations'] / GiB:.2f} | "
                     f"{e['peak'] / GiB:.2f} | {'fits' if e['peak'] <= 15 * GiB else 'no'} |")
    print('\n'.join(lines))

if __name__ == '__main__': main(*sys.argv[1:])

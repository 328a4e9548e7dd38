"""Time `export_controlnet` and the diffusers round trip for SD1.5- and SD2.1-shaped ControlNets (random weights, CPU).

    python benchmarks/export_full_size.py            # prints one line per shape and precision
"""
import gc, resource, tempfile, time
from pathlib import Path

import torch
from diffusers import ControlNetModel

from anime_pose.export import export_controlnet, export_difference

SHAPES = {'sd15': dict(cross_attention_dim=768),
          'sd21': dict(cross_attention_dim=1024, use_linear_projection=True, attention_head_dim=(5, 10, 20, 20))}

if __name__ == '__main__':
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads')
    with tempfile.TemporaryDirectory() as folder:
        for name, shape in SHAPES.items():
            torch.manual_seed(0)
            model = ControlNetModel(**shape)
            params = sum(p.numel() for p in model.parameters())
            for fp16 in (False, True):
                start = time.perf_counter()
                out = export_controlnet(model, Path(folder), fp16=fp16)
                exported = time.perf_counter() - start
                start = time.perf_counter()
                difference = export_difference(out, model)
                loaded = time.perf_counter() - start
                print(f'{out.name}: {params / 1e6:.1f}M parameters, {out.stat().st_size / 2**20:.0f} MiB, '
                      f'export {exported:.1f} s, from_single_file + compare {loaded:.1f} s, largest difference {difference:g}')
                out.unlink()
            del model; gc.collect()
    print(f'peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB')

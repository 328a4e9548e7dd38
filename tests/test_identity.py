"Training the denoiser too (train_unet): it learns, resumes exactly, and the memory plan counts it."
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anime_pose.finetune import DiffusionMethod
from anime_pose.train import TrainConfig, list_checkpoints, override_config, train
from anime_pose.plan import estimate_memory


class Crash(Exception): pass


def tiny_diffusion(**overrides):
    values = dict(synthetic_characters=4, base_steps=2, max_steps=4, batch_size=2, validate_every=2,
                  validation_batches=1, sample_every=0, checkpoint_every=2, train_unet=True, unet_learning_rate=1e-3)
    return override_config(TrainConfig(), {**values, **overrides})


def weights(run: Path, name: str, folder: str = 'final') -> dict:
    return load_file(run / folder / name / 'diffusion_pytorch_model.safetensors')


def test_a_trained_unet_changes_and_resumes_bit_identically(tmp_path):
    class Crashing(DiffusionMethod):
        calls = 0
        def training_step(self, batch):
            Crashing.calls += 1
            if Crashing.calls == 3: raise Crash('killed in step 3')
            return super().training_step(batch)
    config = tiny_diffusion()
    train(config, tmp_path / 'straight', progress=False)
    base, final = weights(tmp_path / 'straight', 'unet', 'base'), weights(tmp_path / 'straight', 'unet')
    assert any(not torch.equal(base[k], final[k]) for k in base), 'train_unet left the denoiser unchanged'
    with pytest.raises(Crash): train(config, tmp_path / 'killed', method=Crashing, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / 'killed')] == ['checkpoint-2']
    train(config, tmp_path / 'killed', resume=True, progress=False)
    for name in ('unet', 'controlnet', 'reference_net'):
        resumed, straight = weights(tmp_path / 'killed', name), weights(tmp_path / 'straight', name)
        assert all(torch.equal(resumed[k], straight[k]) for k in straight), name


def test_the_denoiser_has_its_own_learning_rate():
    method = DiffusionMethod(tiny_diffusion(learning_rate=1e-3, unet_learning_rate=1e-5), accelerator=None)
    method.controlnet, method.reference_net, method.unet = (torch.nn.Linear(2, 2) for _ in range(3))
    method.trainable = ('controlnet', 'reference_net', 'unet')
    groups = method.configure_optimizers()['main'].param_groups
    assert [(len(g['params']), g['lr']) for g in groups] == [(4, 1e-3), (2, 1e-5)]


def test_the_plan_counts_a_trained_unet():
    frozen, trained = estimate_memory(tiny_diffusion(train_unet=False)), estimate_memory(tiny_diffusion())
    unet = trained['parameters']['unet']
    assert trained['trainable_parameters'] == frozen['trainable_parameters'] + unet
    assert trained['memory']['optimizer_state'] > frozen['memory']['optimizer_state']

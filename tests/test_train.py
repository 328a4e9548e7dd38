"Training machinery: configuration, data order, checkpoints, exact resume, divergence, command line, accelerate launch."
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from anime_pose.cli import main
import anime_pose.finetune  # registers 'diffusion' for the runs below that name it (installed: an entry point too)
from anime_pose.train import (ConfigError, ToyMethod, TrainConfig, TrainingDiverged, batch_indices, list_checkpoints,
                              load_config, load_method, override_config, read_losses, save_checkpoint, train)

BIN = Path(sys.executable).parent


def toy_config(**overrides):
    values = dict(method='toy', max_steps=30, batch_size=8, learning_rate=3e-2, validate_every=10, checkpoint_every=10,
                  keep_checkpoints=3, sample_every=0)
    return override_config(TrainConfig(), {**values, **overrides})


def weights(run: Path) -> dict:
    return load_file(run / 'final' / 'model.safetensors')


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), k


# ---- configuration ----

def test_config_file_round_trip_and_overrides(tmp_path):
    config = override_config(load_config('tiny'), {'learning_rate': '5e-5', 'train_reference': 'no', 'loss': 'huber'})
    assert (config.learning_rate, config.train_reference, config.loss) == (5e-5, False, 'huber')
    config.save(tmp_path / 'c.json')
    assert load_config(tmp_path / 'c.json') == config


@pytest.mark.parametrize('overrides, message', [
    ({'loss': 'l3'}, "loss='l3' is invalid"),
    ({'resolution': 60}, 'multiple of 8'),
    ({'batch_size': 0}, 'batch_size=0 is invalid'),
    ({'conditioning_dropout': 1.5}, 'probability'),
    ({'mixed_precision': 'fp8'}, 'one of no, fp16, bf16'),
    ({'lerning_rate': 1}, "unknown field 'lerning_rate'"),
    ({'cache': 'maybe'}, "cache='maybe' is not a bool"),
])
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message): override_config(TrainConfig(), overrides)


def test_bad_config_files(tmp_path):
    (tmp_path / 'broken.json').write_text('{"seed": ')
    (tmp_path / 'list.json').write_text('[1, 2]')
    (tmp_path / 'typo.json').write_text('{"max_step": 3}')
    with pytest.raises(ConfigError, match='not a JSON file'): load_config(tmp_path / 'broken.json')
    with pytest.raises(ConfigError, match='expected a JSON object'): load_config(tmp_path / 'list.json')
    with pytest.raises(ConfigError, match="typo.json': unknown field 'max_step'"): load_config(tmp_path / 'typo.json')
    with pytest.raises(ConfigError, match='no such configuration file'): load_config(tmp_path / 'missing.json')


def test_methods_are_registered_by_name_or_found_by_module_path():
    from anime_pose.train import METHODS
    from anime_pose.finetune import DiffusionMethod
    assert METHODS['diffusion'] is DiffusionMethod and 'gan' not in METHODS or METHODS['gan'].__module__ == 'anime_pose.gan'
    assert load_method('toy') is ToyMethod
    assert load_method('anime_pose.train:ToyMethod') is ToyMethod
    with pytest.raises(ConfigError, match="method 'nope' is unknown"): load_method('nope')
    with pytest.raises(ConfigError, match='cannot import'): load_method('no_such_package.x:Y')
    with pytest.raises(ConfigError, match='no TrainMethod subclass called Nope'): load_method('anime_pose.train:Nope')
    source = (Path(__file__).parents[1] / 'anime_pose' / 'train.py').read_text()
    imported = [line.split()[1] for line in source.splitlines() if line.startswith(('import ', 'from '))]
    assert not {'.gan', '.finetune', 'anime_pose.gan', 'anime_pose.finetune'} & set(imported)


def test_methods_are_found_through_the_entry_points_settings_declares(monkeypatch):
    "settings.ini's `methods` (the `anime_pose.methods` entry points setup.py installs) name both built-in methods."
    import configparser
    from importlib.metadata import EntryPoint
    import anime_pose.train as train_module
    from anime_pose.finetune import DiffusionMethod
    from anime_pose.gan import GANMethod
    settings = configparser.ConfigParser()
    settings.read(Path(__file__).parents[1] / 'settings.ini', encoding='utf-8')
    specs = settings['DEFAULT']['methods'].split()
    points = [EntryPoint(*spec.split('=', 1), group=train_module.METHOD_GROUP) for spec in specs]
    assert {point.name: point.load() for point in points} == {'diffusion': DiffusionMethod, 'gan': GANMethod}
    monkeypatch.setattr(train_module, 'METHODS', {})  # as in a process that imported only anime_pose.train
    monkeypatch.setattr(train_module, 'entry_points', lambda group: [p for p in points if p.group == group])
    assert load_method('diffusion') is DiffusionMethod and load_method('gan') is GANMethod
    with pytest.raises(ConfigError, match="expected one of diffusion, gan or"): load_method('nope')


# ---- data order ----

def test_batch_indices_cover_each_epoch_and_split_across_processes():
    n, size = 12, 4
    stream = [i for m in range(6) for i in batch_indices(n, size, m, seed=5)]
    assert sorted(stream[:12]) == list(range(12)) and sorted(stream[12:]) == list(range(12)) and stream[:12] != stream[12:]
    two = [batch_indices(n, size // 2, m, seed=5, rank=r, world_size=2) for m in range(6) for r in range(2)]
    assert [i for b in two for i in b] == stream  # two processes of 2 see what one process of 4 sees
    assert batch_indices(n, size, 3, seed=6) != batch_indices(n, size, 3, seed=5)


def test_batch_smaller_than_dataset_wraps_into_next_epoch():
    indices = batch_indices(3, 5, 0, seed=0)
    assert len(indices) == 5 and set(indices) == {0, 1, 2}


# ---- the loop ----

def test_toy_training_learns_and_writes_the_run_directory(tmp_path):
    summary = train(toy_config(), tmp_path / 'run', progress=False)
    rows = read_losses(tmp_path / 'run')
    train_losses = [r['loss'] for r in rows if r['split'] == 'train']
    assert len(train_losses) == 30 and summary['steps'] == 30
    assert [r['step'] for r in rows if r['split'] == 'test'] == [0, 10, 20, 30]
    assert rows[-1]['loss'] < rows[0]['loss'] / 3
    assert [p.name for p in list_checkpoints(tmp_path / 'run')] == ['checkpoint-10', 'checkpoint-20']
    assert load_config(tmp_path / 'run' / 'config.json') == toy_config()
    assert (tmp_path / 'run' / 'final' / 'model.safetensors').exists()


class Crash(Exception): pass


def crashing(at_call: int):
    class CrashingToy(ToyMethod):
        calls = 0
        def training_step(self, batch):
            CrashingToy.calls += 1
            if CrashingToy.calls == at_call: raise Crash(f'killed in call {at_call}')
            return super().training_step(batch)
    return CrashingToy


@pytest.mark.parametrize('accumulation, crash_call', [(1, 17), (2, 25), (1, 3)])
def test_killed_and_resumed_run_ends_with_identical_weights(tmp_path, accumulation, crash_call):
    config = toy_config(gradient_accumulation=accumulation)
    train(config, tmp_path / 'straight', progress=False)
    with pytest.raises(Crash): train(config, tmp_path / 'killed', method=crashing(crash_call), progress=False)
    assert not (tmp_path / 'killed' / 'final').exists()
    train(config, tmp_path / 'killed', resume=True, progress=False)
    assert_same_weights(weights(tmp_path / 'killed'), weights(tmp_path / 'straight'))
    assert read_losses(tmp_path / 'killed') == read_losses(tmp_path / 'straight')


def test_resume_ignores_a_half_written_checkpoint(tmp_path):
    config = toy_config()
    train(config, tmp_path / 'straight', progress=False)
    with pytest.raises(Crash): train(config, tmp_path / 'run', method=crashing(25), progress=False)
    half = tmp_path / 'run' / '.checkpoint-30.abc.tmp'
    half.mkdir()
    (half / 'model.safetensors').write_bytes(b'\0' * 10)
    (tmp_path / 'run' / 'checkpoint-40').mkdir()  # a directory without trainer_state.json is not a checkpoint
    assert list_checkpoints(tmp_path / 'run')[-1].name == 'checkpoint-20'
    train(config, tmp_path / 'run', resume=True, progress=False)
    assert not half.exists()
    assert_same_weights(weights(tmp_path / 'run'), weights(tmp_path / 'straight'))


def test_refuses_to_overwrite_a_run(tmp_path):
    train(toy_config(max_steps=2), tmp_path / 'run', progress=False)
    with pytest.raises(ConfigError.__mro__[1], match='already holds a training run'):
        train(toy_config(max_steps=2), tmp_path / 'run', progress=False)


def test_nan_loss_stops_naming_step_and_last_good_checkpoint(tmp_path):
    class Exploding(ToyMethod):
        calls = 0
        def training_step(self, batch):
            Exploding.calls += 1
            loss = super().training_step(batch)
            return loss * float('inf') if Exploding.calls == 14 else loss
    with pytest.raises(TrainingDiverged, match=r"loss is (inf|nan) at step 14; the last good checkpoint is .*checkpoint-10"):
        train(toy_config(), tmp_path / 'run', method=Exploding, progress=False)
    with pytest.raises(TrainingDiverged, match='no checkpoint was written yet'):
        Exploding.calls = 0
        train(toy_config(checkpoint_every=0), tmp_path / 'run2', method=Exploding, progress=False)


def test_checkpoints_are_safetensors_and_json_only(tmp_path):
    train(toy_config(), tmp_path / 'run', progress=False)
    checkpoint = list_checkpoints(tmp_path / 'run')[-1]
    assert {p.suffix for p in checkpoint.iterdir()} == {'.safetensors', '.json'}
    assert json.loads((checkpoint / 'trainer_state.json').read_text())['step'] == 20


# ---- command line ----

ONE_THREAD = {**os.environ, 'OMP_NUM_THREADS': '1'}


def anime_pose(*args, **kwargs):
    return subprocess.run([str(BIN / 'anime-pose'), *args], capture_output=True, text=True, env=ONE_THREAD, **kwargs)


def test_cli_trains_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(['train', '--method', 'toy', '--out', str(out), '--max-steps', '6', '--checkpoint-every', '2', '--seed', '4',
                 '--loss', 'l1', '--set', 'validate_every=3']) == 0
    assert 'trained 6 steps' in capsys.readouterr().out
    saved = load_config(out / 'config.json')
    assert (saved.seed, saved.loss, saved.max_steps, saved.validate_every) == (4, 'l1', 6, 3)
    assert main(['train', '--out', str(out), '--resume', '--max-steps', '8']) == 0  # the saved config is the base
    assert load_config(out / 'config.json').max_steps == 8 and load_config(out / 'config.json').seed == 4
    capsys.readouterr()
    assert main(['train', '--out', str(out), '--resume', '--max-steps', '6']) == 0  # checkpoint-6: final/ from it
    assert 'nothing left to train: the run was at step 6' in capsys.readouterr().out
    assert main(['train', '--out', str(out), '--resume', '--max-steps', '4']) == 1  # past it: refused, nothing written
    assert "checkpoint-6' is at step 6, past max_steps=4" in capsys.readouterr().err
    assert load_config(out / 'config.json').max_steps == 6


def test_cli_errors_are_one_line(tmp_path, capsys):
    result = anime_pose('train', '--method', 'toy', '--out', str(tmp_path), '--set', 'batch_size=-1')
    assert result.returncode == 1 and result.stderr.strip().count('\n') == 0 and 'batch_size=-1 is invalid' in result.stderr
    assert main(['train', '--method', 'toy']) == 1 and '--out DIR is required' in capsys.readouterr().err
    assert main(['train', '--config', str(tmp_path / 'nothing.json'), '--out', str(tmp_path / 'x')]) == 1
    assert 'no such configuration file' in capsys.readouterr().err
    assert main(['train', '--method', 'toy', '--out', str(tmp_path / 'y'), '--set', 'seed']) == 1
    assert "--set 'seed': expected FIELD=VALUE" in capsys.readouterr().err


def test_cli_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
    args = ['train', '--method', 'toy', '--max-steps', '600', '--checkpoint-every', '20', '--set', 'validate_every=0',
            '--set', 'keep_checkpoints=2']
    assert anime_pose(*args, '--out', str(tmp_path / 'straight')).returncode == 0
    process = subprocess.Popen([str(BIN / 'anime-pose'), *args, '--out', str(tmp_path / 'killed')],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    deadline = time.time() + 120
    while not list_checkpoints(tmp_path / 'killed') and time.time() < deadline and process.poll() is None: time.sleep(0.05)
    process.send_signal(signal.SIGKILL); process.wait()
    assert not (tmp_path / 'killed' / 'final').exists(), 'the run finished before it could be killed'
    assert anime_pose(*args, '--out', str(tmp_path / 'killed'), '--resume').returncode == 0
    assert_same_weights(weights(tmp_path / 'killed'), weights(tmp_path / 'straight'))


def test_accelerate_launch_with_two_cpu_processes(tmp_path):
    out = tmp_path / 'ddp'
    env = {**ONE_THREAD, 'CUDA_VISIBLE_DEVICES': ''}  # two CPU processes, DDP over gloo, even on a machine with a GPU
    result = subprocess.run([str(BIN / 'accelerate'), 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
                             '--mixed_precision', 'no', '--dynamo_backend', 'no', str(BIN / 'anime-pose'), 'train',
                             '--method', 'toy', '--out', str(out), '--max-steps', '20', '--checkpoint-every', '10',
                             '--batch-size', '4'], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / 'checkpoint-10' / 'trainer_state.json').read_text())
    assert state['world_size'] == 2
    assert result.stdout.count('trained 20 steps') == 1  # reported once, by the main process
    rows = read_losses(out)
    assert [r['step'] for r in rows if r['split'] == 'train'] == list(range(1, 21))
    assert rows[-1]['loss'] < rows[0]['loss']



def test_accelerate_launch_cpu_with_two_processes_is_refused_in_one_line(tmp_path):
    # accelerate's --cpu launcher starts one process whatever --num_processes says: refused, naming the right spelling
    result = subprocess.run([str(BIN / 'accelerate'), 'launch', '--cpu', '--num_processes', '2', '--num_machines', '1',
                             '--mixed_precision', 'no', '--dynamo_backend', 'no', str(BIN / 'anime-pose'), 'train',
                             '--method', 'toy', '--out', str(tmp_path / 'run'), '--max-steps', '2'],
                            capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert result.returncode == 1, result.stderr[-3000:]  # accelerate's own traceback of the child's exit follows
    (line,) = [line for line in result.stderr.splitlines() if 'accelerate launch started 1 process' in line]
    assert line.startswith('anime-pose train: error: ') and 'accelerate launch --multi_gpu --num_processes N' in line
    assert not (tmp_path / 'run').exists()


def test_report_to_tensorboard_logs_or_names_the_extra(tmp_path, capsys):
    from accelerate.utils import is_tensorboard_available
    args = ['train', '--method', 'toy', '--out', str(tmp_path / 'run'), '--max-steps', '3', '--report-to', 'tensorboard']
    if not is_tensorboard_available():
        assert main(args) == 1
        assert 'pip install "anime_pose[tensorboard]", or pass --report-to none' in capsys.readouterr().err
        assert not (tmp_path / 'run').exists()
    else:
        assert main(args) == 0
        assert list((tmp_path / 'run').rglob('events.out.tfevents.*'))
    assert main(['train', '--method', 'toy', '--out', str(tmp_path / 'plain'), '--max-steps', '3']) == 0
    assert not list((tmp_path / 'plain').rglob('events.out.tfevents.*'))  # default: no tracker


def test_ema_weights_are_final_checkpointed_and_resume_exactly(tmp_path):
    config = toy_config(ema_decay=0.9)
    train(config, tmp_path / 'straight', progress=False)
    train(toy_config(), tmp_path / 'raw', progress=False)
    ema, raw = weights(tmp_path / 'straight'), weights(tmp_path / 'raw')
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # same trajectory, averaged
    checkpoint = list_checkpoints(tmp_path / 'straight')[-1]
    assert {'ema.safetensors', 'ema.json'} <= {p.name for p in checkpoint.iterdir()}
    assert {p.suffix for p in checkpoint.iterdir()} == {'.safetensors', '.json'}
    with pytest.raises(Crash): train(config, tmp_path / 'killed', method=crashing(17), progress=False)
    train(config, tmp_path / 'killed', resume=True, progress=False)
    assert_same_weights(weights(tmp_path / 'killed'), ema)
    with pytest.raises(ConfigError, match='has no EMA weights'):
        with pytest.raises(Crash): train(toy_config(), tmp_path / 'plain', method=crashing(17), progress=False)
        train(config, tmp_path / 'plain', resume=True, progress=False)


# ---- the diffusion method (tiny models, a few steps) ----

torch.set_num_threads(1)  # the machine's cores are shared: one thread per test process avoids oversubscription


def tiny_diffusion(**overrides):
    values = dict(synthetic_characters=4, base_steps=2, max_steps=4, batch_size=2, validate_every=2, validation_batches=1,
                  sample_every=0, checkpoint_every=2)
    return override_config(TrainConfig(), {**values, **overrides})


def trained(run: Path, name: str) -> dict:
    return load_file(run / 'final' / name / 'diffusion_pytorch_model.safetensors')


@pytest.mark.parametrize('train_unet, warped', [(False, False), (True, False), (True, True)])
def test_diffusion_killed_and_resumed_equals_uninterrupted(tmp_path, train_unet, warped):
    from anime_pose.finetune import DiffusionMethod
    class Crashing(DiffusionMethod):
        calls = 0
        def training_step(self, batch):
            Crashing.calls += 1
            if Crashing.calls == 3: raise Crash('killed in step 3')
            return super().training_step(batch)
    config = tiny_diffusion(train_unet=train_unet, unet_learning_rate=1e-3, warped_reference=warped)
    train(config, tmp_path / 'straight', progress=False)
    with pytest.raises(Crash): train(config, tmp_path / 'killed', method=Crashing, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / 'killed')] == ['checkpoint-2']
    train(config, tmp_path / 'killed', resume=True, progress=False)
    for name in ('unet', 'controlnet', 'reference_net'):
        assert_same_weights(trained(tmp_path / 'killed', name), trained(tmp_path / 'straight', name))
    assert read_losses(tmp_path / 'killed') == read_losses(tmp_path / 'straight')
    base = load_file(tmp_path / 'straight' / 'base' / 'unet' / 'diffusion_pytorch_model.safetensors')
    final = trained(tmp_path / 'straight', 'unet')
    changed = any(not torch.equal(base[k], final[k]) for k in base)
    assert changed == train_unet  # the base UNet stays frozen unless train_unet
    from anime_pose.pipeline import PoseTransferPipeline
    pipe = PoseTransferPipeline.from_pretrained(tmp_path / 'straight' / 'final')
    assert pipe.reference_net is not None
    assert (pipe.unet.config.in_channels, pipe.controlnet.config.in_channels) == ((8, 8) if warped else (4, 4))
    if warped:  # the warp channels were opened by training
        assert final['conv_in.weight'][:, 4:].abs().sum() > 0


def test_warped_training_reads_the_same_warps_with_and_without_a_cache(tmp_path):
    "The cache stores the warps the uncached path computes each step."
    from anime_pose.finetune import DiffusionMethod
    warps = []
    for cache in (True, False):
        method = DiffusionMethod(tiny_diffusion(warped_reference=True, train_unet=True, cache=cache), accelerator=None)
        method.out = tmp_path / f'cache-{cache}'
        from accelerate import Accelerator
        method.accelerator = Accelerator(cpu=True, project_dir=str(method.out))
        method.build()
        batch = method.get_batch('train', [0, 1])
        torch.manual_seed(0)
        warped = method._warped(batch)
        assert warped.shape == (2, 4, 8, 8) and warped.abs().sum() > 0
        warps.append(warped)
    torch.testing.assert_close(warps[0], warps[1], atol=1e-4, rtol=1e-4)


def test_subject_weighted_loss_reads_the_same_weights_with_and_without_a_cache(tmp_path):
    "subject_weight caches each target's latent weights (a cache of its own) and the uncached path computes the same."
    from accelerate import Accelerator
    from anime_pose.finetune import DiffusionMethod, _cache_key
    weights = []
    for cache in (True, False):
        method = DiffusionMethod(tiny_diffusion(subject_weight=4.0, cache=cache), Accelerator(cpu=True))
        method.out = tmp_path / f'cache-{cache}'
        method.build()
        batch = method.get_batch('train', [0, 1])
        assert batch['subject_weights'].shape == (2, 1, 8, 8)
        assert batch['subject_weights'].min() == 1 and 2 < batch['subject_weights'].max() <= 4  # background; mostly character
        assert torch.isfinite(method.training_step(batch))
        weights.append(batch['subject_weights'])
    torch.testing.assert_close(weights[0], weights[1])
    assert _cache_key(tiny_diffusion(subject_weight=4.0)) not in (_cache_key(tiny_diffusion()), _cache_key(tiny_diffusion(subject_weight=2.0)))
    plain = DiffusionMethod(tiny_diffusion(), Accelerator(cpu=True))
    plain.out = tmp_path / 'plain'
    plain.build()
    assert 'subject_weights' not in plain.get_batch('train', [0, 1])


def test_the_denoiser_has_its_own_learning_rate():
    from anime_pose.finetune import DiffusionMethod
    method = DiffusionMethod(tiny_diffusion(train_unet=True, learning_rate=1e-3, unet_learning_rate=1e-5), accelerator=None)
    method.controlnet, method.reference_net, method.unet = (torch.nn.Linear(2, 2) for _ in range(3))
    method.trainable = ('controlnet', 'reference_net', 'unet')
    groups = method.configure_optimizers()['main'].param_groups
    assert [(len(g['params']), g['lr']) for g in groups] == [(4, 1e-3), (2, 1e-5)]


def test_the_plan_counts_a_trained_unet():
    from anime_pose.plan import estimate_memory
    frozen, planned = estimate_memory(tiny_diffusion()), estimate_memory(tiny_diffusion(train_unet=True))
    unet = planned['parameters']['unet']
    assert planned['trainable_parameters'] == frozen['trainable_parameters'] + unet
    assert planned['memory']['optimizer_states'] > frozen['memory']['optimizer_states']


def test_cache_holds_what_the_uncached_path_computes(tmp_path):
    from accelerate import Accelerator
    from anime_pose.finetune import DiffusionMethod
    methods = {}
    for cache in (True, False):
        method = DiffusionMethod(tiny_diffusion(cache=cache), Accelerator(cpu=True))
        method.out = tmp_path
        method.build()
        methods[cache] = method
    cached, uncached = (m._encode(m.get_batch('train', [0, 3])) for m in (methods[True], methods[False]))
    for a, b in zip(cached, uncached): torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-2)  # text is cached in fp16
    assert torch.equal(methods[True].get_batch('train', [1])['condition'], methods[False].get_batch('train', [1])['condition'])
    assert len(list((tmp_path / 'cache').iterdir())) == 2  # train and test, built once


def test_small_base_trains_on_16x16_latents_end_to_end(tmp_path):
    import datasets
    from anime_pose.pipeline import PoseTransferPipeline
    summary = train(tiny_diffusion(base_model='small', max_steps=2, checkpoint_every=0, validate_every=0), tmp_path / 'run', progress=False)
    cache = datasets.load_from_disk(str(next((tmp_path / 'run' / 'cache').glob('train-*'))))
    assert np.asarray(cache[0]['target_latents']).shape == (4, 16, 16)
    pipe = PoseTransferPipeline.from_pretrained(summary['final'])
    assert pipe.vae_scale_factor == 4 and len(pipe.controlnet.config.conditioning_embedding_out_channels) == 3
    pipe.set_progress_bar_config(disable=True)
    skeleton = Image.fromarray(np.asarray(cache[0]['skeleton'], np.uint8))
    result = pipe(Image.new('RGB', (64, 64), 'white'), skeleton, height=64, width=64, num_inference_steps=2)
    assert result.images[0].size == (64, 64)


def test_base_pretraining_schedule_runs_for_any_number_of_steps():
    from anime_pose.tiny import _one_cycle
    for steps in range(1, 40):
        optimizer, schedule = _one_cycle([torch.nn.Parameter(torch.zeros(1))], 1e-3, steps)
        rates = []
        for _ in range(steps): rates.append(optimizer.param_groups[0]['lr']); optimizer.step(); schedule.step()  # the rate each step used
        assert max(rates) <= 1e-3 + 1e-12
        if steps >= 4: assert rates[0] < max(rates) and rates[-1] < max(rates)  # warms up, then cools down


def test_losses_and_min_snr():
    from anime_pose.diffusion import DiffusionError, prediction_loss
    from anime_pose.finetune import min_snr_weights
    x, y = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    assert prediction_loss(x, 3 * y, 'l1') == 3 and prediction_loss(x, 3 * y, 'l2') == 9
    assert prediction_loss(x, 3 * y, 'huber', huber_delta=1.0) == 2.5
    assert prediction_loss(x, y, 'l2', weights=torch.tensor([0.0, 2.0])) == 1
    with pytest.raises(DiffusionError, match="unknown loss 'l4'"): prediction_loss(x, y, 'l4')
    alphas = torch.linspace(0.999, 0.001, 1000)
    weights = min_snr_weights(alphas, torch.tensor([0, 999]), 5.0)
    assert weights[0] < 0.01 and weights[1] == 1.0


def test_bad_data_and_base_model_are_named(tmp_path):
    from anime_pose.finetune import DiffusionMethod, load_base
    from anime_pose.train import training_triples
    with pytest.raises(ConfigError, match='no such directory'): training_triples(tiny_diffusion(data=str(tmp_path / 'none')))
    with pytest.raises(ConfigError, match='not a saved DatasetDict'): training_triples(tiny_diffusion(data=str(tmp_path)))
    with pytest.raises(ConfigError.__mro__[1], match='model_index.json, unet/, vae/'):
        load_base(tiny_diffusion(base_model=str(tmp_path)), tmp_path)
    with pytest.raises(ConfigError, match="base_model='sd15' is a shape for --dry-run"): load_base(tiny_diffusion(base_model='sd15'), tmp_path)
    with pytest.raises(ConfigError, match='nothing would train'):
        train(tiny_diffusion(train_controlnet=False, train_reference=False), tmp_path / 'run', progress=False)


def test_dry_run_plans_sd_sizes_without_weights(capsys):
    assert main(['train', '--config', 'sd15', '--dry-run']) == 0
    report = capsys.readouterr().out
    assert 'unet:     859.5 M parameters' in report and 'controlnet:     361.3 M parameters' in report
    assert 'fits a 16 GB GPU' in report and 'does not fit' not in report
    assert main(['train', '--config', 'sd15', '--dry-run', '--set', 'mixed_precision=no', '--set', 'gradient_checkpointing=false',
                 '--set', 'reference_lora_rank=0', '--set', 'optimizer=adamw']) == 0
    assert 'does not fit a 16 GB GPU' in capsys.readouterr().out


def test_accelerate_launch_diffusion_with_two_cpu_processes(tmp_path):
    out = tmp_path / 'ddp'
    env = {**ONE_THREAD, 'CUDA_VISIBLE_DEVICES': ''}
    result = subprocess.run([str(BIN / 'accelerate'), 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
                             '--mixed_precision', 'no', '--dynamo_backend', 'no', str(BIN / 'anime-pose'), 'train',
                             '--out', str(out), '--max-steps', '2', '--checkpoint-every', '1', '--batch-size', '2',
                             '--set', 'synthetic_characters=4', '--set', 'base_steps=1', '--set', 'validate_every=0',
                             '--set', 'train_unet=true', '--set', 'warped_reference=true'],  # the bundled recipe's parts
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / 'checkpoint-1' / 'trainer_state.json').read_text())['world_size'] == 2
    assert (out / 'final' / 'reference_net' / 'diffusion_pytorch_model.safetensors').exists()
    unet = load_file(out / 'final' / 'unet' / 'diffusion_pytorch_model.safetensors')
    assert unet['conv_in.weight'].shape[1] == 8  # the denoiser trained under DDP, reading A's warp


def test_the_denoiser_can_train_as_lora_adapters(tmp_path):
    "unet_lora_rank: adapters on a frozen denoiser (and the warp's input weights in full), folded into plain weights."
    config = tiny_diffusion(train_unet=True, unet_lora_rank=2, unet_learning_rate=1e-2, warped_reference=True,
                            checkpoint_every=0, validate_every=0)
    train(config, tmp_path / 'run', progress=False)
    final = trained(tmp_path / 'run', 'unet')
    base = load_file(tmp_path / 'run' / 'base' / 'unet' / 'diffusion_pytorch_model.safetensors')
    assert not any('lora' in key for key in final) and set(final) == set(base)
    attention = [k for k in base if k.endswith('attn1.to_q.weight')]
    assert attention and all(not torch.equal(base[k], final[k]) for k in attention)  # adapters folded in
    norms = [k for k in base if 'norm' in k and k.endswith('weight')]
    assert all(torch.equal(base[k], final[k]) for k in norms)  # the rest stayed frozen
    assert final['conv_in.weight'][:, 4:].abs().sum() > 0  # the warp's door opened

"Bad input, damaged files and a hostile file system through the real command line: one line, exit 1, nothing lost."
import errno, json, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from anime_pose.core import bundled_path

POSE = {'canvas_width': 64, 'canvas_height': 64,
        'people': [{'pose_keypoints_2d': [v for x, y in [(32, 10), (32, 20), (24, 20), (20, 32), (18, 44), (40, 20),
                                                          (44, 32), (46, 44), (28, 40), (28, 52), (28, 62), (36, 40),
                                                          (36, 52), (36, 62), (30, 8), (34, 8), (28, 9), (36, 9)]
                                          for v in (x, y, 1.0)]}]}
WEIGHTS = 'diffusion_pytorch_model.safetensors'


def anime_pose(*args, cwd):
    return subprocess.run([str(Path(sys.executable).parent / 'anime-pose'), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def one_line_error(result, *words):
    "Exit 1, a single line on stderr that names each of `words`, and no traceback."
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
    for word in words: assert word in lines[0], lines[0]


@pytest.fixture
def inputs(tmp_path):
    Image.new('RGB', (64, 64), 'pink').save(tmp_path / 'reference.png')
    (tmp_path / 'pose.json').write_text(json.dumps(POSE))
    return tmp_path


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.mark.parametrize('command', [
    ['sheet', '--reference', 'reference.png', '--poses', 'pose.json', '--out', 'mine'],
    ['pose', 'draw', 'pose.json', '--out', 'mine'],
    ['evaluate', '--model', 'nowhere', '--out', 'mine'],
    ['demo', '--out', 'mine'],
    ['data', 'filter', '--metadata', 'pose.json', '--out', 'mine'],
    ['data', 'budget', '--pairs', 'pose.json', '--out', 'mine'],
    ['data', 'load', '--manifest', 'pose.json', '--image-root', '.', '--out', 'mine'],
    ['data', 'build', '--metadata', 'pose.json', '--out', 'mine'],
    ['synth', '--out', 'mine', '--characters', '3', '--poses-per-character', '2'],
])
def test_an_existing_folder_is_refused_and_kept(inputs, command):
    (inputs / 'mine').mkdir(); (inputs / 'mine' / 'drawing.png').write_text('years of work')
    before = snapshot(inputs)
    one_line_error(anime_pose(*command, cwd=inputs), 'mine', '--overwrite')
    assert snapshot(inputs) == before


def test_an_existing_file_is_refused_and_kept(inputs):
    (inputs / 'me_posed.png').write_text('an older drawing')
    result = anime_pose('transfer', '--reference', 'reference.png', '--pose', 'pose.json', '--out', 'me_posed.png',
                        '--steps', '1', cwd=inputs)
    one_line_error(result, 'me_posed.png', '--overwrite')
    assert (inputs / 'me_posed.png').read_text() == 'an older drawing'


def test_overwrite_replaces_a_folder_only_when_asked(inputs):
    (inputs / 'mine').mkdir(); (inputs / 'mine' / 'old.png').write_text('old')
    result = anime_pose('pose', 'draw', 'pose.json', '--out', 'mine/skeleton.png', '--overwrite', cwd=inputs)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (inputs / 'mine').iterdir()) == ['old.png', 'skeleton.png']


def _copy_model(folder: Path) -> Path:
    model = folder / 'model'
    shutil.copytree(bundled_path('model'), model)
    return model

def _truncate(path: Path): path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])

DAMAGE = {
    'a truncated UNet': lambda m: _truncate(m / 'unet' / WEIGHTS),
    'a zero-byte ControlNet': lambda m: (m / 'controlnet' / WEIGHTS).write_bytes(b''),
    'model_index.json that is not JSON': lambda m: (m / 'model_index.json').write_text('{not json'),
    'model_index.json that is a list': lambda m: (m / 'model_index.json').write_text('[]'),
    'model_index.json without _class_name': lambda m: (m / 'model_index.json').write_text(json.dumps(
        {k: v for k, v in json.loads((m / 'model_index.json').read_text()).items() if k != '_class_name'})),
    'a ControlNet saved only as .bin': lambda m: ((m / 'controlnet' / WEIGHTS).unlink(),
                                                  torch.save({}, m / 'controlnet' / 'diffusion_pytorch_model.bin')),
    'a pickle under a .safetensors name': lambda m: torch.save({'a': torch.zeros(2)}, m / 'unet' / WEIGHTS),
    'a UNet config that is not JSON': lambda m: (m / 'unet' / 'config.json').write_text('{'),
}

@pytest.mark.parametrize('damage', DAMAGE)
def test_a_damaged_model_folder_is_one_line(inputs, damage):
    DAMAGE[damage](_copy_model(inputs))
    result = anime_pose('transfer', '--model', 'model', '--reference', 'reference.png', '--pose', 'pose.json',
                        '--out', 'out.png', '--steps', '1', cwd=inputs)
    one_line_error(result, 'model')
    assert not (inputs / 'out.png').exists()


@pytest.mark.parametrize('device, words', [('bogus', ["unknown device 'bogus'"]), ('cuda:7', ['not available'])])
def test_an_unusable_device_is_one_line(inputs, device, words):
    result = anime_pose('transfer', '--reference', 'reference.png', '--pose', 'pose.json', '--out', 'out.png',
                        '--device', device, cwd=inputs)
    one_line_error(result, *words)
    assert not (inputs / 'out.png').exists()


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes through read-only permissions')
def test_a_read_only_folder_is_one_line(inputs):
    (inputs / 'locked').mkdir(); (inputs / 'locked').chmod(0o555)
    one_line_error(anime_pose('pose', 'draw', 'pose.json', '--out', 'locked/skeleton.png', cwd=inputs), 'locked')


def _toy_run(out: Path, *extra):
    return ['train', '--method', 'toy', '--out', str(out), '--checkpoint-every', '2', '--seed', '3',
            '--set', 'keep_checkpoints=3', *extra]

def _final_weights(run: Path) -> bytes:
    return b''.join(p.read_bytes() for p in sorted((run / 'final').rglob('*.safetensors')))

@pytest.mark.parametrize('damage', ['truncated weights', 'corrupt trainer_state.json', 'zero-byte optimizer'])
def test_resume_passes_over_a_damaged_checkpoint_to_the_newest_intact_one(tmp_path, damage):
    straight = anime_pose(*_toy_run(tmp_path / 'straight', '--max-steps', '8'), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    killed = anime_pose(*_toy_run(tmp_path / 'run', '--max-steps', '7'), cwd=tmp_path)  # as if killed after step 7
    assert killed.returncode == 0, killed.stderr
    shutil.rmtree(tmp_path / 'run' / 'final')
    newest = tmp_path / 'run' / 'checkpoint-6'
    if damage == 'truncated weights': _truncate(newest / 'model.safetensors')
    elif damage == 'corrupt trainer_state.json': (newest / 'trainer_state.json').write_text('{"step": ')
    else: (newest / 'optimizer-main.safetensors').write_bytes(b'')
    resumed = anime_pose('train', '--out', 'run', '--resume', '--max-steps', '8', cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert 'damaged checkpoint-6' in resumed.stderr and 'resuming from checkpoint-4' in resumed.stderr
    assert newest.exists()  # nothing the user trained is deleted by the resume
    assert _final_weights(tmp_path / 'run') == _final_weights(tmp_path / 'straight')


def test_resume_with_every_checkpoint_damaged_is_one_line(tmp_path):
    assert anime_pose(*_toy_run(tmp_path / 'run', '--max-steps', '5'), cwd=tmp_path).returncode == 0
    for checkpoint in (tmp_path / 'run').glob('checkpoint-*'): (checkpoint / 'model.safetensors').write_bytes(b'')
    one_line_error(anime_pose('train', '--out', 'run', '--resume', '--max-steps', '6', cwd=tmp_path),
                   'no intact checkpoint', 'checkpoint-4', 'checkpoint-2')


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_a_full_or_read_only_disk_is_one_line_and_leaves_nothing(inputs, monkeypatch, capsys, code):
    from anime_pose import core
    from anime_pose.cli import main
    def refuse(source, target): raise OSError(code, os.strerror(code), str(target))
    monkeypatch.setattr(core.os, 'replace', refuse)  # the moment the finished output would appear
    monkeypatch.chdir(inputs)
    assert main(['pose', 'draw', 'pose.json', '--out', 'skeleton.png']) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and os.strerror(code).lower() in lines[0] and 'skeleton.png' in lines[0], lines
    assert not (inputs / 'skeleton.png').exists() and not list(inputs.glob('.*.tmp'))


def test_a_missing_reference_is_refused_before_the_model_loads(inputs, monkeypatch, capsys):
    from anime_pose import pipeline
    from anime_pose.cli import main
    def never(*args, **kwargs): raise AssertionError('the model was loaded before the inputs were checked')
    monkeypatch.setattr(pipeline, 'load_pipeline', never)
    monkeypatch.chdir(inputs)
    assert main(['transfer', '--reference', 'missing.png', '--pose', 'pose.json', '--out', 'out.png']) == 1
    assert "'missing.png': no such file" in capsys.readouterr().err

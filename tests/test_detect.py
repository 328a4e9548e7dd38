"Pose B from a drawing, through the real command line, offline (issue 17)."
import json, os, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anime_pose.pose import Pose, is_skeleton_image, pck
from anime_pose.synthetic import random_identity, render_character, sample_pose


def anime_pose(*args, cwd):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    return subprocess.run([str(Path(sys.executable).parent / 'anime-pose'), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env)


def one_line_error(result, *words):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
    for word in words: assert word in lines[0], lines[0]


@pytest.fixture(scope='module')
def drawing():
    "Another character in the 'arms_up' pose, 256 px, and its true pose."
    rng = np.random.default_rng(17)
    rendering = render_character(random_identity(rng), sample_pose(rng, 'arms_up'), 256, (236, 244, 252))
    return rendering.image, Pose(rendering.keypoints, 256, 256)


@pytest.fixture
def inputs(tmp_path, drawing):
    image, truth = drawing
    image.save(tmp_path / 'drawing.png')
    truth.skeleton_image().save(tmp_path / 'skeleton.png')
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(tmp_path / 'noise.png')
    Image.new('RGB', (200, 300), 'white').save(tmp_path / 'empty.png')
    render_character(random_identity(np.random.default_rng(3)), sample_pose(np.random.default_rng(3), 'standing'), 64).image.save(tmp_path / 'reference.png')
    return tmp_path


def test_skeleton_images_are_recognised_and_drawings_and_noise_are_not(inputs):
    assert is_skeleton_image(inputs / 'skeleton.png')
    assert not any(is_skeleton_image(inputs / name) for name in ('drawing.png', 'noise.png', 'empty.png'))


def test_pose_detect_a_drawing_offline_with_the_default_parser(inputs, drawing):
    result = anime_pose('pose', 'detect', 'drawing.png', '--out', 'pose.json', cwd=inputs)
    assert result.returncode == 0, result.stderr
    assert pck(Pose.from_openpose(inputs / 'pose.json'), drawing[1], 0.1) >= 0.8
    result = anime_pose('pose', 'detect', 'skeleton.png', '--out', 'read.json', cwd=inputs)  # read back by colour
    assert result.returncode == 0, result.stderr
    assert pck(Pose.from_openpose(inputs / 'read.json'), drawing[1], 0.05) >= 0.9


def test_pose_detect_nobody_is_one_line_and_writes_nothing(inputs):
    for name in ('empty.png', 'noise.png'):
        one_line_error(anime_pose('pose', 'detect', name, '--out', 'pose.json', cwd=inputs), f"no person found in '{name}'")
        assert not (inputs / 'pose.json').exists()


def test_openpose_hub_id_offline_fails_at_once_with_the_download_command(inputs):
    started = time.time()
    anime_pose('pose', 'detect', 'empty.png', '--out', 'pose.json', cwd=inputs)  # start-up and imports, for comparison
    baseline, started = time.time() - started, time.time()
    result = anime_pose('pose', 'detect', 'drawing.png', '--detector', 'openpose', '--out', 'pose.json', cwd=inputs)
    assert time.time() - started < baseline + 5  # no waiting for the hub
    one_line_error(result, 'offline', 'huggingface-cli download lllyasviel/Annotators')
    assert not (inputs / 'pose.json').exists()


def test_openpose_hub_id_offline_fails_in_under_5_seconds():
    from anime_pose.parser import load_detector
    from anime_pose.pose import PoseError
    os.environ['HF_HUB_OFFLINE'] = '1'
    try:
        started = time.time()
        with pytest.raises(PoseError, match='huggingface-cli download'): load_detector('openpose')
        assert time.time() - started < 5
    finally: del os.environ['HF_HUB_OFFLINE']


def test_transfer_takes_a_drawing_as_pose_b(inputs):
    result = anime_pose('transfer', '--reference', 'reference.png', '--pose', 'drawing.png', '--out', 'out.png', '--steps', 1, cwd=inputs)
    assert result.returncode == 0, result.stderr
    assert Image.open(inputs / 'out.png').size[0] > 0
    result = anime_pose('transfer', '--reference', 'reference.png', '--pose', 'drawing.png', '--out', 'retargeted.png',
                        '--steps', 1, '--retarget', cwd=inputs)  # A's pose found in the reference
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('name', ['noise.png', 'empty.png'])
def test_transfer_refuses_a_picture_with_nobody_in_one_line(inputs, name):
    one_line_error(anime_pose('transfer', '--reference', 'reference.png', '--pose', name, '--out', 'out.png', '--steps', 1, cwd=inputs),
                   f"no person found in '{name}'")
    assert not (inputs / 'out.png').exists()


def test_sheet_takes_drawings_and_skeletons(inputs):
    result = anime_pose('sheet', '--reference', 'reference.png', '--poses', 'drawing.png', 'skeleton.png', '--out', 'sheet',
                        '--steps', 1, cwd=inputs)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (inputs / 'sheet').iterdir()) == ['000_drawing.png', '001_skeleton.png', 'sheet.png']

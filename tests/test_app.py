"The notebook UI's logic, without a browser: uploads, pose previews, generation with progress, saving, and the widgets' callbacks."
import io, json, subprocess, sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anime_pose import app
from anime_pose.app import (AppError, PoseInput, PoseTransferApp, TransferSettings, generate, parse_canvas, pose_preview,
                            progress_to, read_pose_file, save_gallery, synthetic_characters, synthetic_poses, uploaded_files)
from anime_pose.pose import PoseError, pose_from_joints

JOINTS = {'nose': (0.5, 0.15), 'neck': (0.5, 0.25), 'right_shoulder': (0.4, 0.25), 'left_shoulder': (0.6, 0.25),
          'right_elbow': (0.35, 0.4), 'left_elbow': (0.65, 0.4), 'right_hip': (0.45, 0.55), 'left_hip': (0.55, 0.55)}


@pytest.fixture(scope='module')
def pipe():
    from anime_pose.pipeline import load_pipeline
    return load_pipeline('tiny', device='cpu')  # the untrained tiny components: fast, and every code path


@pytest.fixture(scope='module')
def synthetic_app(pipe):
    return PoseTransferApp(pipe, synthetic_size=64)


def png_bytes(image):
    data = io.BytesIO(); image.save(data, 'PNG'); return data.getvalue()


def upload(*files):
    "A FileUpload value as ipywidgets 8 gives it."
    return tuple({'name': name, 'type': '', 'size': len(content), 'content': memoryview(content), 'last_modified': datetime.now()}
                 for name, content in files)


def pose_json(width=64, height=96):
    return json.dumps(pose_from_joints(JOINTS, width, height, normalised=True).to_openpose()).encode()


def test_uploaded_files_reads_ipywidgets_8_and_7_values():
    assert uploaded_files(upload(('a.json', b'{}'), ('b.png', b'xy'))) == [('a.json', b'{}'), ('b.png', b'xy')]
    assert uploaded_files({'a.json': {'content': b'{}', 'metadata': {}}}) == [('a.json', b'{}')]
    assert uploaded_files(()) == []


def test_read_pose_file_json_skeleton_and_detection():
    from_json = read_pose_file('p.JSON', pose_json())
    assert from_json.pose is not None and (from_json.pose.width, from_json.pose.height) == (64, 96) and from_json.image is None
    np.testing.assert_allclose(from_json.pose.keypoints[1, :2], JOINTS['neck'], atol=1e-3)
    skeleton = read_pose_file('s.png', png_bytes(from_json.pose.skeleton_image()))
    assert skeleton.pose is None and skeleton.source is skeleton.image
    class Detector:
        def detect(self, image): return [from_json.pose]
    detected = read_pose_file('photo.jpg', png_bytes(Image.new('RGB', (8, 12), 'white')), Detector())
    assert detected.source is from_json.pose and detected.image.size == (8, 12)
    class Blind:
        def detect(self, image): return []
    with pytest.raises(PoseError, match='no person found'): read_pose_file('photo.jpg', png_bytes(Image.new('RGB', (8, 8))), Blind())


@pytest.mark.parametrize('name, content, message', [
    ('bad.json', b'{"people": [', "'bad.json': not OpenPose JSON"),
    ('latin.json', '{"é": 1}'.encode('latin-1'), "'latin.json': not OpenPose JSON"),
    ('nobody.json', b'{"people": []}', "'nobody.json'"),
    ('bad.png', b'PNG? no', 'not an image'),
    ('empty.png', b'', 'no image data'),
])
def test_read_pose_file_refuses_broken_files_by_name(name, content, message):
    with pytest.raises(app.AnimePoseError, match=message): read_pose_file(name, content)


def test_pixel_json_needs_the_canvas_box(pipe):
    pixels = json.dumps({'people': [{'pose_keypoints_2d': [300, 100, 0.9, 300, 200, 0.9] + [0, 0, 0] * 16}]}).encode()
    ui = PoseTransferApp(pipe, synthetic_size=64)
    assert ui._report(ui.upload_poses, upload(('openpose.json', pixels))) is False and 'coordinates are in pixels' in ui.status.value
    ui.canvas.value = '600 x 400'
    assert ui._report(ui.upload_poses, upload(('openpose.json', pixels)))
    np.testing.assert_allclose(ui.uploaded_poses[0].pose.keypoints[:2, :2], [[0.5, 0.25], [0.5, 0.5]], atol=1e-6)
    ui.canvas.value = 'big'
    assert ui._report(ui.upload_reference_pose, upload(('me.json', pixels))) is False and 'expected WIDTHxHEIGHT' in ui.status.value


def test_pose_preview_keeps_the_pose_canvas_aspect_and_draws_over_the_picture():
    pose = pose_from_joints(JOINTS, 64, 96, normalised=True)
    assert pose_preview(PoseInput('p', pose), 100).size == (100, 150)
    over = np.asarray(pose_preview(PoseInput('p', pose, Image.new('RGB', (10, 10), (0, 255, 0))), 64))
    green = (over == (0, 255, 0)).all(-1)
    assert 0.5 < green.mean() < 1  # the picture shows where no bone is drawn, bones cover the rest
    skeleton_image = Image.new('RGB', (40, 20))
    assert pose_preview(PoseInput('s', None, skeleton_image), 80).size == (80, 40)


@pytest.mark.parametrize('text, expected', [('512x768', (512, 768)), (' 64 X 32 ', (64, 32)), ('', None), ('  ', None)])
def test_parse_canvas(text, expected):
    assert parse_canvas(text) == expected


@pytest.mark.parametrize('text', ['512', '512x', 'axb', '0x10', '10x-5', '1x2x3'])
def test_parse_canvas_refuses(text):
    with pytest.raises(AppError, match=f"canvas '{text}'"): parse_canvas(text)


def test_synthetic_choices():
    characters = synthetic_characters(2, seed=3, size=48)
    assert list(characters) == ['character 0', 'character 1'] and characters['character 0'].image.size == (48, 48)
    assert characters['character 0'].pose.visible.sum() >= 10
    assert not np.array_equal(np.asarray(characters['character 0'].image), np.asarray(characters['character 1'].image))
    poses = synthetic_poses(48)
    assert {'standing', 'sitting', 'arms_up'} <= set(poses) and all(p.pose is not None for p in poses.values())


def test_generate_reports_progress_and_is_seeded(pipe):
    characters, poses = synthetic_characters(1, size=64), synthetic_poses(64)
    reference, chosen = characters['character 0'].image, [poses['arms_up'], poses['sitting']]
    steps = []
    first = generate(pipe, reference, chosen, TransferSettings(steps=2, seed=5), progress=lambda *step: steps.append(step))
    assert steps == [(0, 2), (1, 2), (2, 2)] and len(first.images) == 2
    again = generate(pipe, reference, chosen, TransferSettings(steps=2, seed=5))
    other = generate(pipe, reference, chosen, TransferSettings(steps=2, seed=6))
    assert np.array_equal(np.asarray(first.images[1]), np.asarray(again.images[1]))
    assert not np.array_equal(np.asarray(first.images[1]), np.asarray(other.images[1]))
    assert 'progress_bar' not in vars(pipe)  # the pipeline's own bar is back


def test_generate_refuses_missing_inputs_and_restores_progress_on_error(pipe):
    poses = synthetic_poses(64)
    with pytest.raises(AppError, match='choose a reference character first'): generate(pipe, None, [poses['standing']], TransferSettings())
    with pytest.raises(AppError, match='at least one pose'): generate(pipe, Image.new('RGB', (64, 64)), [], TransferSettings())
    with pytest.raises(app.AnimePoseError, match='num_inference_steps'):
        generate(pipe, Image.new('RGB', (64, 64)), [poses['standing']], TransferSettings(steps=0), progress=lambda *step: None)
    assert 'progress_bar' not in vars(pipe)
    with progress_to(pipe, None): assert 'progress_bar' not in vars(pipe)


def test_save_gallery_writes_each_image_and_the_sheet(tmp_path):
    images = [Image.new('RGB', (8, 8), c) for c in ('red', 'green', 'blue')]
    paths = save_gallery(images, ['a.json', 'b c', '../d'], tmp_path / 'out')
    assert [p.name for p in paths] == ['000_a.png', '001_b_c.png', '002_d.png', 'sheet.png']
    assert Image.open(paths[1]).getpixel((0, 0)) == (0, 128, 0) and Image.open(paths[-1]).size == (28, 8)
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == sorted(p.name for p in paths)
    with pytest.raises(AppError, match='generate first'): save_gallery([], [], tmp_path)


def test_default_model_is_the_bundled_model_when_present(tmp_path, monkeypatch):
    import importlib.resources
    from anime_pose.pipeline import bundled_model_dir
    monkeypatch.setattr(importlib.resources, 'files', lambda package: tmp_path / package)
    assert bundled_model_dir() is None
    (tmp_path / 'anime_pose' / 'assets' / 'model').mkdir(parents=True)
    (tmp_path / 'anime_pose' / 'assets' / 'model' / 'model_index.json').write_text('{}')
    assert bundled_model_dir() == tmp_path / 'anime_pose' / 'assets' / 'model'


def test_app_synthetic_pose_sheet_generate_and_save(synthetic_app, tmp_path):
    ui = synthetic_app
    ui.character.value = 'character 1'  # the dropdown's callback picks the reference
    assert ui.reference is ui.characters['character 1'].image and ui.reference_pose is ui.characters['character 1'].pose
    ui.pose_choice.value = ('arms_up', 'sitting', 'waving')
    assert len(ui.pose_view.children) == 1  # one-pose mode: only the first
    ui.sheet_mode.value = 'pose sheet'
    assert len(ui.pose_view.children) == 3
    ui.steps.value, ui.retarget.value, ui.seed.value = 1, True, 3
    assert ui.settings() == TransferSettings(steps=1, retarget=True, seed=3, guidance=5.0, controlnet_scale=1.0,
                                             noise_scale=1.0)  # the tiny model's uncalibrated defaults
    ui.generate_button.click()
    assert ui.status.value == 'done: 3 images', ui.status.value
    assert len(ui.gallery.children) == 3 and ui.progress.value == ui.progress.max == 1
    ui.save_folder.value = str(tmp_path / 'saved')
    ui.save_button.click()
    assert sorted(p.name for p in (tmp_path / 'saved').iterdir()) == ['000_arms_up.png', '001_sitting.png', '002_waving.png', 'sheet.png']
    assert 'saved 4 files' in ui.status.value


def test_app_uploads_and_user_errors_in_the_status_bar(pipe, tmp_path):
    ui = PoseTransferApp(pipe, synthetic_size=64)
    ui.save_folder.value = str(tmp_path / 'never')
    ui.save_button.click()
    assert 'generate first' in ui.status.value and not (tmp_path / 'never').exists()
    assert ui._report(ui.upload_reference, upload(('me.png', png_bytes(Image.new('RGB', (30, 40), 'pink'))))) is True
    assert ui.reference.size == (30, 40) and ui.reference_pose is None
    assert ui._report(ui.upload_reference, upload(('me.png', b'junk'))) is False and 'not an image' in ui.status.value
    ui.pose_choice.value = ()
    skeleton = png_bytes(pose_from_joints(JOINTS, 64, 96, normalised=True).skeleton_image())
    ui.pose_upload.value = upload(('p.json', pose_json()), ('s.png', skeleton))  # through the widget's callback
    ui.sheet_mode.value = 'pose sheet'
    assert [p.name for p in ui.chosen_poses()] == ['p.json', 's.png'] and len(ui.pose_view.children) == 2
    assert ui._report(ui.upload_poses, upload(('white.png', png_bytes(Image.new('RGB', (64, 64), 'white'))))) is False
    assert "no person found in &#x27;white.png&#x27;" in ui.status.value  # a blank picture is no pose
    ui.pose_upload.value = ()  # an empty upload clears the uploaded poses
    assert ui.chosen_poses() == []
    ui.generate_button.click()
    assert 'at least one pose' in ui.status.value
    ui._report(ui.upload_poses, upload(('p.json', pose_json())))
    ui.retarget.value, ui.steps.value = True, 1
    ui.generate_button.click()
    assert 'retarget needs the reference pose' in ui.status.value
    assert ui._report(ui.upload_reference_pose, upload(('me.json', pose_json(30, 40))))
    ui.generate_button.click()
    assert ui.status.value == 'done: 1 image' and len(ui.gallery.children) == 1
    assert ui._report(ui.upload_poses, upload(('bad.json', b'['))) is False and 'bad.json&#x27;: not OpenPose JSON' in ui.status.value


def test_the_widget_holds_every_control(synthetic_app):
    import ipywidgets as w
    def walk(widget): return [widget, *[c for child in getattr(widget, 'children', ()) for c in walk(child)]]
    shown = walk(synthetic_app.widget())
    for control in ('character', 'reference_upload', 'reference_pose_upload', 'pose_choice', 'pose_upload', 'canvas', 'sheet_mode', 'retarget',
                    'steps', 'guidance', 'controlnet_scale', 'noise_scale', 'reference_strength', 'seed', 'generate_button', 'progress', 'save_button', 'gallery'):
        assert getattr(synthetic_app, control) in shown, control
    assert isinstance(synthetic_app.widget(), w.VBox)


def test_the_sliders_start_at_the_models_drawing_defaults(pipe):
    from anime_pose.pipeline import PoseTransferPipeline
    calibrated = PoseTransferApp(PoseTransferPipeline(**pipe.components, controlnet_conditioning_scale=2.5, guidance_scale=1.5,
                                                      noise_scale=0.8), synthetic_size=64)
    assert (calibrated.controlnet_scale.value, calibrated.guidance.value, calibrated.noise_scale.value) == (2.5, 1.5, 0.8)
    assert calibrated.settings().noise_scale == 0.8


def colab_cell():
    notebook = json.loads((Path(__file__).parents[1] / 'nbs' / '11_app.ipynb').read_text())
    sources = [''.join(c['source']) for c in notebook['cells'] if c['cell_type'] == 'code']
    cells = [source for source in sources if 'anime_pose on Colab' in source]
    assert len(cells) == 1
    return cells[0]


def test_colab_cell_does_nothing_when_installed(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, 'run', lambda *a, **k: calls.append(a))
    exec(colab_cell(), {})
    assert calls == []


def _run_colab_cell_without_anime_pose(monkeypatch, source):
    "Run the Colab cell as on a machine without anime_pose, with ANIME_POSE_SOURCE = `source`; the pip commands."
    import importlib.util
    calls, real_find_spec = [], importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'anime_pose' else real_find_spec(name, *a))
    monkeypatch.setattr(subprocess, 'run', lambda command, **k: calls.append(command))
    cell = colab_cell()
    assert cell.count("\nANIME_POSE_SOURCE = ''\n") == 1  # the one place a user sets
    exec(cell.replace("\nANIME_POSE_SOURCE = ''\n", f"\nANIME_POSE_SOURCE = {source!r}\n"), {})
    return calls


def test_colab_cell_stops_with_one_sentence_when_the_source_is_not_set(monkeypatch):
    with pytest.raises(SystemExit, match='set ANIME_POSE_SOURCE at the top of this cell') as stop:
        _run_colab_cell_without_anime_pose(monkeypatch, '  ')
    assert str(stop.value).count('. ') == 0 and str(stop.value).endswith('.')
    with pytest.raises(SystemExit, match='does not exist here'):
        _run_colab_cell_without_anime_pose(monkeypatch, '/content/no-such-anime_pose.whl')


def test_colab_cell_installs_keeping_the_torch_already_there(monkeypatch, tmp_path):
    from importlib.metadata import version
    wheel = tmp_path / 'anime_pose-0.1.0-py3-none-any.whl'
    wheel.write_bytes(b'')
    for source, installs in (('https://git.example.org/me/anime_pose', 'anime_pose @ git+https://git.example.org/me/anime_pose'),
                             ('git+https://git.example.org/me/anime_pose@dev', 'anime_pose @ git+https://git.example.org/me/anime_pose@dev'),
                             (str(wheel), str(wheel))):
        (command,) = _run_colab_cell_without_anime_pose(monkeypatch, source)
        assert command[:4] == [sys.executable, '-m', 'pip', 'install'] and command[-1] == installs
        constraints = Path(command[command.index('-c') + 1])
        assert f'torch=={version("torch")}' in constraints.read_text().splitlines()
        constraints.unlink()

"PoseTransferPipeline: tiny components, determinism, poses in every form, sheets, saving and loading, errors, the CLI."
import json, subprocess, sys
from pathlib import Path

import numpy as np
import pytest, torch
from PIL import Image

from anime_pose.controlnet import ModelError, controlnet_from_unet, zero_convolutions
from anime_pose.core import ImageError
from anime_pose.pipeline import PoseTransferPipeline, TransferError, check_model_dir, fit_reference, poses_and_skeletons
from anime_pose.tiny import DANBOORU_WORDS, tiny_components, tiny_tokenizer
from anime_pose.pose import Pose, PoseError, pose_from_joints

STANDING = {'nose': (32, 10), 'neck': (32, 18), 'right_shoulder': (26, 18), 'right_elbow': (22, 28), 'right_wrist': (20, 38),
            'left_shoulder': (38, 18), 'left_elbow': (42, 28), 'left_wrist': (44, 38), 'right_hip': (28, 36), 'right_knee': (28, 46),
            'right_ankle': (28, 58), 'left_hip': (36, 36), 'left_knee': (36, 46), 'left_ankle': (36, 58)}
ARMS_UP = {**STANDING, 'right_elbow': (22, 12), 'right_wrist': (20, 4), 'left_elbow': (42, 12), 'left_wrist': (44, 4)}


@pytest.fixture(scope='module')
def pipe():
    pipe = PoseTransferPipeline(**tiny_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope='module')
def steering_pipe():
    "A pipeline whose ControlNet's zero convolutions are open, so that the pose changes the image."
    components = tiny_components(seed=0)
    with torch.no_grad():
        for conv in zero_convolutions(components['controlnet']): torch.nn.init.normal_(conv.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    pipe = PoseTransferPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope='module')
def reference():
    image = Image.new('RGB', (48, 64), (250, 240, 230)); image.paste((40, 60, 200), (16, 8, 32, 56))
    return image


@pytest.fixture(scope='module')
def poses(): return pose_from_joints(STANDING, 64, 64), pose_from_joints(ARMS_UP, 64, 64)


def arrays(output): return [np.asarray(image).astype(int) for image in output.images]


def run(pipe, reference, pose, seed=0, **kwargs):
    return pipe(reference, pose, prompt='1girl, solo, blue hair', num_inference_steps=2, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_tiny_tokenizer_spells_tags_and_never_loses_text():
    tokenizer = tiny_tokenizer()
    tokens = tokenizer.tokenize('long hair, Twintails')
    assert tokens == ['long</w>', 'hair</w>', ',</w>', 'twintails</w>']
    assert all(len(tokenizer.tokenize(word)) == 1 for word in DANBOORU_WORDS)
    ids = tokenizer('ザ unseen-word 😀').input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(' ', '') == 'ザunseen-word😀'


def test_tiny_components_are_seeded():
    a, b, c = tiny_components(seed=0), tiny_components(seed=0), tiny_components(seed=1)
    for name in ('vae', 'text_encoder', 'unet', 'controlnet'):
        first = next(iter(a[name].state_dict().values()))
        assert torch.equal(first, next(iter(b[name].state_dict().values())))
        assert not torch.equal(first, next(iter(c[name].state_dict().values()))), name


def test_same_seed_same_images_other_seed_other_images(pipe, reference, poses):
    first, second, other = run(pipe, reference, poses[0]), run(pipe, reference, poses[0]), run(pipe, reference, poses[0], seed=1)
    assert len(first.images) == 1 and first.images[0].size == (64, 64) and first.images[0].mode == 'RGB'
    assert np.array_equal(arrays(first)[0], arrays(second)[0])
    assert not np.array_equal(arrays(first)[0], arrays(other)[0])


def test_noise_scale_scales_the_starting_noise_and_a_stored_one_is_the_default(pipe, reference, poses):
    default, one, half = (run(pipe, reference, poses[0], output_type='latent', **k).images
                          for k in ({}, dict(noise_scale=1.0), dict(noise_scale=0.5)))
    assert torch.equal(default, one) and not torch.allclose(default, half)
    calm = PoseTransferPipeline(**pipe.components, noise_scale=0.5)  # as calibration stores it in model_index.json
    calm.set_progress_bar_config(disable=True)
    assert torch.equal(run(calm, reference, poses[0], output_type='latent').images, half)
    assert torch.equal(run(calm, reference, poses[0], output_type='latent', noise_scale=1.0).images, default)


def test_reference_strength_zero_ignores_the_reference(pipe, reference, poses):
    other = Image.new('RGB', (64, 64), (200, 30, 30))
    a, b = run(pipe, reference, poses[0], reference_strength=0), run(pipe, other, poses[0], reference_strength=0)
    assert np.array_equal(arrays(a)[0], arrays(b)[0])
    a, b = run(pipe, reference, poses[0]), run(pipe, other, poses[0])
    assert not np.array_equal(arrays(a)[0], arrays(b)[0])


def test_the_pose_steers_and_scale_zero_switches_it_off(steering_pipe, reference, poses):
    standing, arms_up = (run(steering_pipe, reference, pose, output_type='latent').images for pose in poses)
    assert standing.shape == (1, 4, 8, 8) and (standing - arms_up).abs().max() > 1e-4  # identical inputs give identical latents
    off = [run(steering_pipe, reference, pose, controlnet_conditioning_scale=0, output_type='latent').images for pose in poses]
    assert torch.equal(off[0], off[1])


def test_a_sheet_is_independent_of_batching(steering_pipe, reference, poses):
    sheet = run(steering_pipe, reference, list(poses) * 2, output_type='latent').images
    one_by_one = run(steering_pipe, reference, list(poses) * 2, batch_size=1, output_type='latent').images
    assert sheet.shape == (4, 4, 8, 8)
    torch.testing.assert_close(sheet, one_by_one, rtol=0, atol=1e-4)
    assert (sheet[0] - sheet[2]).abs().max() > 1e-2  # each pose has its own noise
    assert len(run(steering_pipe, reference, list(poses) * 2).images) == 4


@pytest.mark.parametrize('guidance', [1.0, 3.0])
def test_a_batch_of_triples_draws_what_single_calls_draw(steering_pipe, poses, guidance):
    "Sample i of a batch (its own reference, pose, prompt and generator) equals the single call with the same inputs."
    references = [Image.new('RGB', (64, 64), colour) for colour in ((250, 240, 230), (200, 30, 30), (30, 200, 30))]
    chosen, prompts, seeds = [poses[0], poses[1], poses[0]], ['1girl, solo, blue hair', '1boy, red hair', '1girl'], [0, 1, 0]
    settings = dict(negative_prompt='lowres', num_inference_steps=2, guidance_scale=guidance)
    single = [steering_pipe(reference, pose, prompt=prompt, generator=torch.Generator().manual_seed(seed), **settings)
              for reference, pose, prompt, seed in zip(references, chosen, prompts, seeds)]
    batch = lambda **kwargs: steering_pipe(references, chosen, prompt=prompts, **settings, **kwargs,
                                           generator=[torch.Generator().manual_seed(seed) for seed in seeds])
    for batch_size in (None, 2):  # one batch of three, and batches of two and one
        latents = batch(batch_size=batch_size, output_type='latent').images
        expected = torch.cat([steering_pipe(r, p, prompt=t, generator=torch.Generator().manual_seed(s), output_type='latent',
                                            **settings).images for r, p, t, s in zip(references, chosen, prompts, seeds)])
        torch.testing.assert_close(latents, expected, rtol=0, atol=1e-4)  # float sums in another order: ~1e-6 apart
    drawn = [np.asarray(image).astype(int) for image in batch().images]
    assert all(np.abs(a - np.asarray(b.images[0]).astype(int)).max() <= 1 for a, b in zip(drawn, single))
    swapped = steering_pipe(references[::-1], chosen, prompt=prompts, **settings, output_type='latent',
                            generator=[torch.Generator().manual_seed(seed) for seed in seeds]).images
    assert (swapped[0] - latents[0]).abs().max() > 1e-3  # each sample reads its own reference


@pytest.fixture(scope='module')
def warped_pipe():
    "A small pipeline that reads a warped reference, its warp input channels opened (random) as if trained (see test_warp)."
    parts = tiny_components(0, warped_reference=True, shape='small')
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in (parts['unet'], parts['controlnet']):
            model.conv_in.weight[:, 4:] = torch.randn(model.conv_in.weight[:, 4:].shape, generator=generator) * 0.5
    pipe = PoseTransferPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize('guidance', [1.0, 3.0])
def test_a_warped_batch_of_triples_draws_what_single_calls_draw(warped_pipe, guidance):
    "Each sample's own reference is warped from its own A's pose (given, or detected) onto its pose, as a single call does."
    from anime_pose.synthetic import random_identity, render_character, sample_pose
    rng = np.random.default_rng(3)
    drawn = [render_character(random_identity(rng), sample_pose(rng), 64) for _ in range(2)]
    targets = [render_character(random_identity(rng), sample_pose(rng), 64).pose for _ in range(3)]
    references, prompts = [drawn[0].image, drawn[1].image, drawn[0].image], ['1girl, blue hair', '1boy', '1girl, blue hair']
    given = [drawn[0].pose, drawn[1].pose, None]  # the third: A's pose found by the detector
    settings = dict(negative_prompt='lowres', num_inference_steps=2, guidance_scale=guidance, output_type='latent')
    seeded = lambda: [torch.Generator().manual_seed(seed) for seed in (0, 1, 2)]
    expected = torch.cat([warped_pipe(r, p, prompt=t, reference_pose=a, retarget=False, generator=g, **settings).images
                          for r, p, t, a, g in zip(references, targets, prompts, given, seeded())])
    for batch_size in (None, 2):
        batch = warped_pipe(references, targets, prompt=prompts, reference_pose=given, retarget=False, generator=seeded(),
                            batch_size=batch_size, **settings).images
        torch.testing.assert_close(batch, expected, rtol=0, atol=1e-4)
    unwarped = warped_pipe(references, targets, prompt=prompts, reference_pose=[None, None, None], retarget=False,
                           generator=seeded(), **settings).images
    assert (unwarped[0] - expected[0]).abs().max() > 1e-3  # the given A's pose is what the first sample warps from
    sheet = warped_pipe(drawn[0].image, targets, prompt=prompts[0], generator=seeded(), batch_size=2, **settings).images
    alone = torch.cat([warped_pipe(drawn[0].image, p, prompt=prompts[0], generator=g, **settings).images
                       for p, g in zip(targets, seeded())])
    torch.testing.assert_close(sheet, alone, rtol=0, atol=1e-4)  # one reference, detected once, for every pose


def test_a_batch_of_triples_is_checked(pipe, reference, poses):
    with pytest.raises(TransferError, match='2 references for 3 poses: give one reference, or one per pose'):
        run(pipe, [reference, reference], [poses[0]] * 3)
    with pytest.raises(TransferError, match='2 prompts for 1 poses'):
        pipe(reference, poses[0], prompt=['a', 'b'], num_inference_steps=1)
    with pytest.raises(TransferError, match='1 generators for 2 poses'):
        pipe(reference, list(poses), num_inference_steps=1, generator=[torch.Generator()])
    with pytest.raises(TransferError, match='1 reference poses for 2 poses'):
        pipe(reference, list(poses), num_inference_steps=1, reference_pose=[poses[0]])
    with pytest.raises(TransferError, match='retarget needs the reference pose'):
        pipe(reference, list(poses), num_inference_steps=1, reference_pose=[poses[0], None], retarget=True)


def test_every_pose_form_gives_the_same_skeleton(tmp_path, poses):
    pose = poses[0]
    pose.save(tmp_path / 'b.json')
    skeleton = pose.skeleton_image(64, 64)
    skeleton.save(tmp_path / 'b.png')
    forms = [pose, tmp_path / 'b.json', str(tmp_path / 'b.json'), json.loads((tmp_path / 'b.json').read_text()), skeleton, tmp_path / 'b.png']
    for form in forms: assert np.array_equal(np.asarray(poses_and_skeletons(form, 64, 64)[1][0]), np.asarray(skeleton)), form
    assert len(poses_and_skeletons([pose, skeleton, tmp_path / 'b.json'], 64, 64)[1]) == 3


def test_retarget_takes_the_reference_proportions(poses):
    short_arms = pose_from_joints({**STANDING, 'right_elbow': (24, 23), 'right_wrist': (23, 28), 'left_elbow': (40, 23), 'left_wrist': (41, 28)}, 64, 64)
    plain, retargeted = poses_and_skeletons(poses[1], 64, 64)[1], poses_and_skeletons(poses[1], 64, 64, reference_pose=short_arms)[1]
    assert not np.array_equal(np.asarray(plain[0]), np.asarray(retargeted[0]))
    assert np.array_equal(np.asarray(poses_and_skeletons(poses[1], 64, 64, reference_pose=short_arms, retarget=False)[1][0]), np.asarray(plain[0]))
    with pytest.raises(TransferError, match='retarget needs the reference pose'): poses_and_skeletons(poses[1], 64, 64, retarget=True)[1]
    with pytest.raises(TransferError, match='cannot retarget a skeleton image'): poses_and_skeletons(plain[0], 64, 64, reference_pose=short_arms, retarget=True)[1]


def test_bad_requests_fail_before_running(pipe, reference, poses, tmp_path):
    cases = [(dict(height=60), TransferError, 'height must be a positive multiple of 8, got 60'),
             (dict(width=0), TransferError, 'width must be a positive multiple of 8'),
             (dict(num_inference_steps=0), TransferError, 'num_inference_steps must be a positive integer'),
             (dict(guidance_scale=-1), TransferError, 'guidance_scale must be a number >= 0'),
             (dict(noise_scale=float('nan')), TransferError, 'noise_scale must be a number >= 0'),
             (dict(reference_strength=float('nan')), TransferError, 'reference_strength must be a number >= 0'),
             (dict(batch_size=0), TransferError, 'batch_size must be a positive integer'),
             (dict(output_type='np'), TransferError, "output_type must be 'pil' or 'latent'")]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message): pipe(reference, poses[0], **kwargs)
    with pytest.raises(PoseError, match='no usable joints'): pipe(reference, Pose(np.zeros((18, 3), np.float32), 64, 64))
    with pytest.raises(PoseError, match='no person found'): pipe(reference, Image.new('RGB', (64, 64)))
    with pytest.raises(TransferError, match='no pose given'): pipe(reference, [])
    with pytest.raises(ImageError, match='no such file'): pipe(tmp_path / 'missing.png', poses[0])
    (tmp_path / 'empty.json').write_text('{"people": []}')
    with pytest.raises(PoseError): pipe(reference, tmp_path / 'empty.json')


def test_fit_reference_pads_without_distortion():
    wide = Image.new('RGB', (80, 20), (0, 0, 255))
    fitted = fit_reference(wide, 64, 64)
    assert fitted.size == (64, 64) and fitted.getpixel((32, 32)) == (0, 0, 255) and fitted.getpixel((32, 2)) == (255, 255, 255)


def test_mismatched_components_are_refused():
    components = tiny_components()
    with pytest.raises(ModelError, match='text encoder is 64 wide'): PoseTransferPipeline(**{**components, 'text_encoder': tiny_components(cross_attention_dim=64)['text_encoder']})
    with pytest.raises(ModelError, match='does not fit the UNet'): PoseTransferPipeline(**{**components, 'controlnet': tiny_components(cross_attention_dim=64)['controlnet']})


@pytest.mark.parametrize('width', [768, 1024])
def test_cross_attention_width_comes_from_the_config(width, reference, poses):
    pipe = PoseTransferPipeline(**tiny_components(cross_attention_dim=width))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.attn_processors and pipe.unet.config.cross_attention_dim == width
    assert pipe(reference, poses[0], num_inference_steps=1).images[0].size == (64, 64)


def test_v_prediction(pipe, reference, poses):
    v_pipe = PoseTransferPipeline(**tiny_components(prediction_type='v_prediction'))
    v_pipe.set_progress_bar_config(disable=True)
    assert v_pipe.scheduler.config.prediction_type == 'v_prediction'
    assert not np.array_equal(arrays(run(v_pipe, reference, poses[0]))[0], arrays(run(pipe, reference, poses[0]))[0])
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon' or 'v_prediction'"): tiny_components(prediction_type='sample')


def test_save_and_load_round_trip(tmp_path, reference, poses):
    pipe = PoseTransferPipeline(**tiny_components(seed=2, reference_net=True))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / 'model')
    assert {'model_index.json', 'unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler', 'controlnet', 'reference_net'} <= {p.name for p in (tmp_path / 'model').iterdir()}
    assert not list((tmp_path / 'model').rglob('*.bin'))
    loaded = PoseTransferPipeline.from_pretrained(tmp_path / 'model')
    loaded.set_progress_bar_config(disable=True)
    assert loaded.reference_net is not None
    assert np.array_equal(arrays(run(loaded, reference, list(poses)))[1], arrays(run(pipe, reference, list(poses)))[1])


def test_loads_a_stable_diffusion_directory_plus_a_controlnet(tmp_path, pipe, reference, poses):
    from diffusers import StableDiffusionPipeline
    parts = {name: getattr(pipe, name) for name in ('vae', 'text_encoder', 'tokenizer', 'unet', 'scheduler')}
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp_path / 'wd')
    pipe.controlnet.save_pretrained(tmp_path / 'controlnet')
    with pytest.raises(ModelError, match=r'missing controlnet/ .*waifu-diffusion layout'): PoseTransferPipeline.from_pretrained(tmp_path / 'wd')
    loaded = PoseTransferPipeline.from_pretrained(tmp_path / 'wd', controlnet=tmp_path / 'controlnet')
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(arrays(run(loaded, reference, poses[0]))[0], arrays(run(pipe, reference, poses[0]))[0])
    fresh = PoseTransferPipeline.from_pretrained(tmp_path / 'wd', controlnet='new')
    assert fresh.controlnet.config.cross_attention_dim == 32


def test_missing_model_files_are_named(tmp_path):
    with pytest.raises(ModelError, match='no such model directory'): PoseTransferPipeline.from_pretrained(tmp_path / 'absent')
    (tmp_path / 'model' / 'unet').mkdir(parents=True)
    (tmp_path / 'model' / 'unet' / 'diffusion_pytorch_model.bin').write_bytes(b'')
    with pytest.raises(ModelError, match=r'missing vae/, text_encoder/, tokenizer/, scheduler/, controlnet/, model_index.json, unet/diffusion_pytorch_model.safetensors'):
        check_model_dir(tmp_path / 'model')


def test_progress_bar_counts_every_step_of_every_batch(pipe, reference, poses, capsys):
    pipe.set_progress_bar_config(disable=False)
    try: run(pipe, reference, list(poses), batch_size=1)
    finally: pipe.set_progress_bar_config(disable=True)
    assert '4/4' in capsys.readouterr().err


def cli(*args):
    return subprocess.run([str(Path(sys.executable).parent / 'anime-pose'), *map(str, args)], capture_output=True, text=True)


def test_cli_transfer_and_sheet(tmp_path, reference, poses):
    (tmp_path / 'poses').mkdir()
    reference.save(tmp_path / 'a.png'); poses[0].save(tmp_path / 'poses' / 'b.json'); poses[1].save(tmp_path / 'poses' / 'c.json')
    result = cli('transfer', '--reference', tmp_path / 'a.png', '--pose', tmp_path / 'poses' / 'b.json', '--out', tmp_path / 'out.png', '--steps', 2, '--seed', 3)
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / 'out.png').size == (64, 64)  # the bundled tiny model's native size
    result = cli('sheet', '--reference', tmp_path / 'a.png', '--poses', tmp_path / 'poses', '--out', tmp_path / 'sheet', '--steps', 2)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / 'sheet').iterdir()) == ['000_b.png', '001_c.png', 'sheet.png']
    assert Image.open(tmp_path / 'sheet' / 'sheet.png').size == (64 * 2 + 2, 64)


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, reference, poses, capsys):
    from anime_pose.cli import main
    reference.save(tmp_path / 'a.png'); poses[0].save(tmp_path / 'b.json')
    common = ('--reference', tmp_path / 'a.png', '--pose', tmp_path / 'b.json', '--steps', 1)
    for extra, message in [(('--out', tmp_path / 'o.png', '--height', 63), 'height must be a positive multiple of 4, got 63'),
                           (('--out', tmp_path / 'o.png', '--model', tmp_path / 'nope'), 'no such model directory'),
                           (('--out', tmp_path / 'o.txt'), 'expected an image file name'),
                           (('--out', tmp_path / 'o.png', '--reference', tmp_path / 'missing.png'), 'no such file')]:
        assert main(['transfer', *map(str, common + extra)]) == 1
        err = capsys.readouterr().err
        assert 'anime-pose transfer: error: ' in err and message in err and 'Traceback' not in err, err
    assert not list(tmp_path.glob('o.*'))
    with pytest.raises(SystemExit): main(['transfer', '--help'])
    assert 'untrained tiny components' in capsys.readouterr().out
    with pytest.raises(SystemExit): main(['sheet', '--reference', 'a.png', '--poses', 'b.json', '--out', 'x', '--canvas', '512'])
    assert 'expected WIDTHxHEIGHT' in capsys.readouterr().err

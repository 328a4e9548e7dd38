"""The warped reference (06b_warp): A's parts moved onto pose B, and the extra input channels that carry it into the denoiser."""
import numpy as np
import pytest
import torch
from PIL import Image

from anime_pose.core import load_image
from anime_pose.metrics import identity_error
from anime_pose.pose import Pose
from anime_pose.synthetic import PART_LABELS, synthetic_dataset
from anime_pose.warp import foreground_mask, reads_warped_reference, warp_reference, widen_input

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def triples():
    return synthetic_dataset(12, 4, 64, seed=23, progress=False)['train']


def pose(keypoints, size=64): return Pose(np.asarray(keypoints, np.float32), size, size)


def test_warp_onto_its_own_pose_gives_back_the_figure(triples):
    for row in triples.select(range(4)):
        own = pose(row['reference_pose'])
        back = np.asarray(warp_reference(row['reference'], own, own).image).astype(int)
        reference = np.asarray(load_image(row['reference']).convert('RGB'))
        figure, _ = foreground_mask(reference)
        assert np.abs(back - reference.astype(int))[figure].mean() < 3


def test_warp_puts_the_characters_colours_where_pose_b_has_them(triples):
    "On unseen characters, the warp's part colours beat the reference as it is (same pose metric as evaluation)."
    warped, copied = [], []
    for row in triples:
        target, masks = load_image(row['target']).convert('RGB'), np.asarray(row['masks'])
        moved = warp_reference(row['reference'], pose(row['reference_pose']), pose(row['pose'])).image
        warped.append(identity_error(moved, target, masks, PART_LABELS))
        copied.append(identity_error(load_image(row['reference']).convert('RGB'), target, masks, PART_LABELS))
    assert np.nanmean(warped) < 0.8 * np.nanmean(copied), (np.nanmean(warped), np.nanmean(copied))


def test_unknown_poses_and_empty_references_leave_the_background(triples):
    row = triples[0]
    nobody = Pose(np.zeros((18, 3), np.float32), 64, 64)
    assert warp_reference(row['reference'], nobody, pose(row['pose'])).covered == 0
    blank = warp_reference(Image.new('RGB', (64, 64), 'white'), pose(row['reference_pose']), pose(row['pose']))
    assert blank.covered == 0 and np.asarray(blank.image).min() == 255


def test_widened_models_compute_the_same_function():
    from anime_pose.tiny import tiny_components
    plain, wide = tiny_components(0), tiny_components(0, warped_reference=True)
    assert reads_warped_reference(wide['unet'], 4) and not reads_warped_reference(plain['unet'], 4)
    assert wide['controlnet'].config.in_channels == 8  # the ControlNet copies the UNet's input layer
    latents, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    warp = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a = plain['unet'](latents, 5, encoder_hidden_states=text).sample
        b = wide['unet'](torch.cat([latents, warp], 1), 5, encoder_hidden_states=text).sample
    torch.testing.assert_close(a, b)
    widen_input(plain['unet'], 4)  # the same surgery on the plain model gives the same input layer
    torch.testing.assert_close(plain['unet'].conv_in.weight, wide['unet'].conv_in.weight)


def _opened(parts, seed=1):
    "The warp channels of UNet and ControlNet given random weights, as if trained."
    generator = torch.Generator().manual_seed(seed)
    for model in (parts['unet'], parts['controlnet']):
        with torch.no_grad():
            model.conv_in.weight[:, 4:] = torch.randn(model.conv_in.weight[:, 4:].shape, generator=generator) * 0.5
    return parts


def test_the_pipeline_warps_the_reference_into_the_denoiser(triples):
    from anime_pose.pipeline import PoseTransferPipeline
    from anime_pose.tiny import tiny_components
    pipe = PoseTransferPipeline(**_opened(tiny_components(0, warped_reference=True, shape='small')))
    pipe.set_progress_bar_config(disable=True)
    row = triples[0]
    def draw(**kwargs):
        return np.asarray(pipe(row['reference'], pose(row['pose']), num_inference_steps=3, retarget=False,
                               generator=torch.Generator().manual_seed(0), **kwargs).images[0]).astype(int)
    given = draw(reference_pose=pose(row['reference_pose']))
    assert np.array_equal(given, draw(reference_pose=pose(row['reference_pose'])))  # deterministic
    other = triples[5]['reference_pose']
    assert np.abs(given - draw(reference_pose=pose(other))).mean() > 0.5  # A's pose steers what is warped where
    assert draw().shape == given.shape  # without A's pose: found by the bundled detector


def test_the_detected_reference_pose_warps_like_the_true_one(triples):
    from anime_pose.pipeline import reference_pose_from_image
    gaps = []
    for row in triples.select(range(0, 40, 3)):
        found = reference_pose_from_image(row['reference'])
        def warped(source): return np.asarray(warp_reference(row['reference'], source, pose(row['pose'])).image).astype(int)
        truth = warped(pose(row['reference_pose']))
        gaps.append((np.abs(warped(found) - truth).mean(), np.abs(warped(pose(triples[5]['reference_pose'])) - truth).mean()))
    detected, wrong = np.mean(gaps, 0)
    assert detected < 0.5 * wrong, (detected, wrong)


def test_a_plain_controlnet_steers_a_warped_unet():
    "The stock OpenPose ControlNet (4 input channels) works with a UNet that reads a warped reference."
    from anime_pose.controlnet import check_controlnet, controlled_prediction
    from anime_pose.tiny import tiny_components
    plain, wide = tiny_components(0), _opened(tiny_components(0, warped_reference=True))
    check_controlnet(wide['unet'], plain['controlnet'])
    with pytest.raises(Exception, match='in_channels'): check_controlnet(plain['unet'], wide['controlnet'])
    latents = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        out = controlled_prediction(wide['unet'], plain['controlnet'], latents, 5, torch.randn(1, 77, 32),
                                    torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 4, 8, 8)


def test_strength_zero_drops_the_warp_with_the_reference(triples):
    "pose_only (reference_strength=0) sees no reference at all: the same image as an unknown A's pose gives."
    from anime_pose.pipeline import PoseTransferPipeline
    from anime_pose.tiny import tiny_components
    pipe = PoseTransferPipeline(**_opened(tiny_components(0, warped_reference=True, shape='small')))
    pipe.set_progress_bar_config(disable=True)
    row = triples[0]
    def draw(**kwargs):
        return np.asarray(pipe(row['reference'], pose(row['pose']), num_inference_steps=2, reference_strength=0.0, retarget=False,
                               generator=torch.Generator().manual_seed(0), **kwargs).images[0])
    nobody = Pose(np.zeros((18, 3), np.float32), 64, 64)
    assert np.array_equal(draw(reference_pose=pose(row['reference_pose'])), draw(reference_pose=nobody))


def test_the_probe_of_a_closed_warp_door_is_the_probe_without_it(triples):
    "A freshly widened model computes what it did: the probe sees the same errors through the warp's channels."
    from anime_pose.evaluate import reference_probe
    from anime_pose.pipeline import PoseTransferPipeline
    from anime_pose.tiny import tiny_components
    rows = list(triples.select(range(8)))
    plain = reference_probe(PoseTransferPipeline(**tiny_components(0, reference_net=True, shape='small')), rows, draws=1)
    wide = reference_probe(PoseTransferPipeline(**tiny_components(0, reference_net=True, warped_reference=True,
                                                                  shape='small')), rows, draws=1)
    for name in ('none', 'own', 'other', 'target'):
        assert wide[name] == pytest.approx(plain[name], rel=1e-5), name


def test_the_warp_baseline_finds_a_and_falls_back_to_the_reference(triples):
    from anime_pose.evaluate import warp_method
    generate = warp_method()
    row = triples[0]
    image = generate(row)
    assert image.size == load_image(row['target']).size
    assert not np.array_equal(np.asarray(image), np.asarray(load_image(row['reference']).convert('RGB')))
    blank = {**row, 'reference': Image.new('RGB', (64, 64), 'white')}
    assert np.asarray(generate(blank)).min() == 255  # nobody found: the (blank) reference itself

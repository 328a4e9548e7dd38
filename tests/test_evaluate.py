"Evaluation: metrics on constructed cases, the parser's decoding, the report, calibration, the demo and the CLI's errors."
import json

import numpy as np
import pytest
import torch
from PIL import Image

from anime_pose.core import AnimePoseError, load_image
from anime_pose.evaluate import evaluate_methods, metrics_table, write_report
from anime_pose.metrics import METRICS, bootstrap_interval, identity_error, identity_parts_error, psnr, silhouette_iou, ssim
from anime_pose.parser import SyntheticParser, _mirror, heatmap_keypoints, load_parser, parse
from anime_pose.pose import MIRRORED, Pose, keypoint_heatmaps
from anime_pose.synthetic import PART_LABELS, synthetic_dataset


def _points(row: dict) -> dict:
    "A metrics row without its bootstrap intervals' ends."
    return {k: v for k, v in row.items() if not k.endswith(('_low', '_high'))}


@pytest.fixture(scope='module')
def triples():
    return list(synthetic_dataset(6, 2, 64, seed=3, progress=False)['train'])


def test_psnr_and_ssim_rank_a_closer_image_higher(triples):
    target = triples[0]['target']
    noisy = Image.fromarray(np.clip(np.asarray(target, np.int16) + np.random.default_rng(0).integers(-8, 9, (64, 64, 3)), 0, 255).astype(np.uint8))
    other = triples[1]['target']
    assert psnr(noisy, target) > psnr(other, target) and ssim(noisy, target) > ssim(other, target)
    assert ssim(target, target) == pytest.approx(1.0)


def test_identity_error_is_zero_for_the_truth_and_grows_with_a_recolour(triples):
    row = triples[0]
    masks, target = np.asarray(row['masks']), np.asarray(row['target']).copy()
    assert identity_error(row['target'], row['target'], masks, PART_LABELS) == 0.0
    target[masks == PART_LABELS['hair']] = (0, 255, 0)
    assert identity_error(Image.fromarray(target), row['target'], masks, PART_LABELS) > 10


def test_identity_error_refuses_mismatched_sizes(triples):
    row = triples[0]
    with pytest.raises(AnimePoseError, match='must match'):
        identity_error(row['target'].resize((32, 32)), row['target'], np.asarray(row['masks']), PART_LABELS)


def test_silhouette_iou_of_truth_and_of_empty():
    masks = np.zeros((10, 10), np.uint8); masks[2:8, 3:7] = PART_LABELS['top']
    assert silhouette_iou(masks, masks) == 1.0
    assert silhouette_iou(np.zeros_like(masks), masks) == 0.0


def test_heatmaps_decode_back_to_their_keypoints():
    rng = np.random.default_rng(0)
    points = torch.tensor(np.concatenate([rng.uniform(0.1, 0.9, (3, 18, 2)), (rng.uniform(size=(3, 18, 1)) > 0.2)], -1), dtype=torch.float32)
    found = heatmap_keypoints(keypoint_heatmaps(points, 32, 1.5 / 32))
    visible = points[..., 2] > 0
    assert torch.equal(found[..., 2] > 0, visible)
    assert (found[..., :2] - points[..., :2])[visible].abs().max() < 0.02  # under 1 px at 64 px


def test_mirroring_swaps_left_and_right(triples):
    row = triples[0]
    images = torch.zeros(1, 3, 64, 64); labels = torch.from_numpy(np.array(row['masks'])).long()[None]
    keypoints = torch.from_numpy(np.asarray(row['pose'], np.float32))[None]
    _, mirrored, _ = _mirror(images, keypoints, labels, torch.tensor([True]))
    visible = keypoints[0, :, 2] > 0
    for joint, mirror in enumerate(MIRRORED):
        if visible[joint]: assert mirrored[0, mirror, 0] == pytest.approx(1 - keypoints[0, joint, 0].item())


def test_metrics_table_marks_the_best_of_each_metric():
    metrics = {'a': dict(pck=0.5, oks=0.4, silhouette_iou=0.9, identity_error=3.0, ssim=0.5, psnr=20.0),
               'b': dict(pck=0.7, oks=0.3, silhouette_iou=0.8, identity_error=5.0, ssim=0.6, psnr=18.0)}
    table = metrics_table(metrics)
    assert '| a | 0.500 | **0.400** | **0.900** | **3.00** | 0.500 | **20.00** |' in table
    assert '| b | **0.700** | 0.300 | 0.800 | 5.00 | **0.600** | 18.00 |' in table


def test_evaluation_writes_a_report_with_every_method_and_metric(tmp_path, triples):
    methods = {'copy_reference': lambda t: t['reference'], 'perfect': lambda t: t['target']}
    metrics, images = evaluate_methods(methods, triples[:3], SyntheticParser(), PART_LABELS, progress=False)
    assert set(metrics) == set(methods) and all(set(m) == set(METRICS) for m in metrics.values())
    assert metrics['perfect']['identity_error'] == 0.0 and metrics['perfect']['ssim'] == pytest.approx(1.0)
    assert metrics['copy_reference']['ssim'] < 1.0
    out = write_report(tmp_path / 'report', metrics, triples[:3], images)
    assert json.loads((out / 'metrics.json').read_text()) == metrics
    assert Image.open(out / 'samples.png').size[0] > 64 * 4 and '| perfect |' in (out / 'report.md').read_text()


def test_parser_round_trip_and_missing_parser(tmp_path):
    parser = SyntheticParser()
    parser.save_pretrained(tmp_path / 'parser', safe_serialization=True)
    assert (tmp_path / 'parser' / 'diffusion_pytorch_model.safetensors').is_file()
    loaded = load_parser(tmp_path / 'parser')
    image = torch.zeros(1, 3, 64, 64)
    assert torch.equal(parser(image)[0], loaded(image)[0])
    with pytest.raises(AnimePoseError, match='no synthetic parser'): load_parser(tmp_path / 'nothing')


def test_demo_on_the_bundled_models_reports_every_method_and_metric(tmp_path):
    from anime_pose.demo import demo
    from anime_pose.evaluate import METHODS
    metrics = demo(tmp_path / 'demo', count=2, num_inference_steps=2, progress=False)
    assert set(METHODS) <= set(metrics) and all(set(_points(metrics[m])) == set(METRICS) for m in METHODS)
    written = json.loads((tmp_path / 'demo' / 'metrics.json').read_text())
    assert written == metrics
    report = (tmp_path / 'demo' / 'report.md').read_text()
    assert all(f'| {m} |' in report for m in METHODS) and 'losses_anime_pose.png' in report
    assert (tmp_path / 'demo' / 'losses_gan.png').is_file()
    from anime_pose.core import bundled_path
    from anime_pose.pipeline import stored_drawing_defaults
    drawn = stored_drawing_defaults(bundled_path('model'))  # the report says how the models drew
    assert (f"ControlNet scale {drawn['controlnet_conditioning_scale']:g}, guidance {drawn['guidance_scale']:g} "
            f"and noise scale {drawn['noise_scale']:g} (calibrated)") in report


def test_batched_evaluation_draws_what_one_at_a_time_draws(triples):
    "Triples of two sizes, drawn in batches of 3 by the bundled model, equal the one-at-a-time images (±1 level)."
    from anime_pose.core import bundled_path
    from anime_pose.evaluate import generate_images, pipeline_method
    from anime_pose.pipeline import PoseTransferPipeline
    pipe = PoseTransferPipeline.from_pretrained(bundled_path('model'))
    small = list(synthetic_dataset(3, 2, 32, seed=4, progress=False)['train'])
    rows = triples[:3] + small[:2] + triples[3:5]  # sizes 64, 32, 64: each size drawn in batches of its own
    method = pipeline_method(pipe, num_inference_steps=2, batch_size=3)
    one_at_a_time = [np.asarray(method(row), np.int16) for row in rows]
    batched = generate_images(method, rows, progress=False)
    assert [image.size for image in batched] == [(64, 64)] * 3 + [(32, 32)] * 2 + [(64, 64)] * 2
    assert max(np.abs(np.asarray(b, np.int16) - a).max() for a, b in zip(one_at_a_time, batched)) <= 1
    assert generate_images(lambda row: row['target'], rows[:2], progress=False) == [row['target'] for row in rows[:2]]


@pytest.mark.parametrize('command', [['demo', '--out', 'x'], ['evaluate', '--model', 'run', '--out', 'x'],
                                     ['calibrate', '--model', 'run'], ['sheet', '--reference', 'a.png', '--poses', 'b.json', '--out', 'x']])
def test_batch_size_is_refused_unless_a_whole_number_of_at_least_one(command, capsys):
    from anime_pose.cli import main
    for bad, why in (('0', '--batch-size must be at least 1, got 0'), ('many', "expected a whole number, got 'many'")):
        with pytest.raises(SystemExit) as exit: main([*command, '--batch-size', bad])
        assert exit.value.code == 2 and why in capsys.readouterr().err


def test_bundled_models_were_trained_on_the_same_characters():
    from anime_pose.demo import load_recipe
    recipe = load_recipe()
    assert recipe['anime_pose']['config']['synthetic_characters'] == recipe['gan']['config']['synthetic_characters']
    assert recipe['anime_pose']['config']['data'] == recipe['gan']['config']['data'] == 'synthetic'


def test_evaluate_cli_refuses_a_directory_that_is_not_a_run(tmp_path):
    import subprocess, sys
    from pathlib import Path
    result = subprocess.run([str(Path(sys.executable).parent / 'anime-pose'), 'evaluate', '--model', str(tmp_path),
                             '--out', str(tmp_path / 'report')], capture_output=True, text=True)
    assert result.returncode == 1 and 'not a training run' in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / 'report').exists()


def test_retrain_follows_a_recipe_and_the_result_evaluates(tmp_path):
    "`demo --retrain`'s path on a recipe shrunk to a few steps: every model is trained, saved and evaluated."
    from anime_pose.demo import load_recipe, retrain_models
    from anime_pose.evaluate import evaluate_models
    from anime_pose.train import TrainConfig, override_config
    recipe = load_recipe()
    shrink = dict(synthetic_characters=6, max_steps=2, base_steps=2, base_vae_steps=2, validate_every=1, sample_every=0, checkpoint_every=0)
    small = {'anime_pose': {'config': {**recipe['anime_pose']['config'], **shrink}, 'calibration': dict(scales=[1, 2], guidances=[1, 3], noise_scales=[1, 0.8], count=1, num_inference_steps=1)},
             'gan': {'config': {**recipe['gan']['config'], **shrink}},
             'parser': dict(characters=6, poses_per_character=2, steps=2, batch_size=4, seed=1)}
    assert set(retrain_models(tmp_path / 'model-only', small, progress=False)) == {'model'}  # `--retrain`: the GAN and parser stay bundled
    models = retrain_models(tmp_path / 'models', small, baselines=True, progress=False)
    assert set(models) == {'model', 'gan', 'parser'} and all(path.is_dir() for path in models.values())
    assert (models['model'] / 'losses.csv').is_file() and (models['model'] / 'model_index.json').is_file()
    calibrated = json.loads((models['model'] / 'model_index.json').read_text())
    assert calibrated['controlnet_conditioning_scale'] in (1.0, 2.0) and calibrated['noise_scale'] in (1.0, 0.8)
    config = override_config(TrainConfig(), small['anime_pose']['config'], 'test')
    metrics = evaluate_models(tmp_path / 'report', models['model'], config, models['gan'], models['parser'],
                              {'anime_pose': models['model']}, count=1, num_inference_steps=1, progress=False)
    assert set(metrics) == {'ground_truth', 'vae_reconstruction', 'copy_reference', 'warp_reference', 'pose_only', 'reference_only', 'gan', 'anime_pose'}


# --- learned metrics (LPIPS, FID, KID, embeddings), real data without masks, and their CLI paths ---

from anime_pose.diffusion import frechet_distance, gaussian_fit
from anime_pose.evaluate import evaluate_models
from anime_pose.metrics import (FID_HELP, LPIPS_NETS, LearnedMetrics, fid, kid, load_image_encoder, load_inception,
                                load_learned_metrics, load_lpips, load_weights, lpips, embedding_similarity, learned_scores,
                                learned_truth, score_real)
from anime_pose.parser import ParserDetector, load_detector


def _random_image(seed, size=64):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    "Randomly initialised networks saved the way their real weights come: torchvision state dicts and a transformers directory."
    from safetensors.torch import save_file
    from torchvision.models import alexnet, inception_v3
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    root = tmp_path_factory.mktemp('weights')
    torch.manual_seed(0)
    torch.save({f'features.{k}': v for k, v in alexnet(weights=None).features.state_dict().items()}, root / 'alexnet.pth')
    save_file({f'lin{i}.model.1.weight': torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS_NETS['alex'][1])}, root / 'alex_linear.safetensors')
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), root / 'inception.pth')
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                              patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(root / 'clip')
    return root


def test_load_weights_reads_tensors_only(tmp_path):
    torch.save({'w': torch.arange(3)}, tmp_path / 'plain.pth')
    assert torch.equal(load_weights(tmp_path / 'plain.pth', 'test')['w'], torch.arange(3))
    torch.save({'layer': torch.nn.Linear(2, 2)}, tmp_path / 'module.pth')
    with pytest.raises(AnimePoseError, match='not a plain state dict'): load_weights(tmp_path / 'module.pth', 'test')
    (tmp_path / 'weights.ckpt').write_bytes(b'x')
    with pytest.raises(AnimePoseError, match="unknown weights format '.ckpt'"): load_weights(tmp_path / 'weights.ckpt', 'test')


def test_fid_is_zero_for_identical_sets_and_recovers_known_gaussians():
    rng = np.random.default_rng(2)
    few = rng.normal(size=(10, 64))  # fewer rows than features: the Gram form
    assert abs(fid(few, few)) < 1e-8
    other = rng.normal(0.3, 1.5, size=(12, 64))
    assert fid(few, other) == pytest.approx(frechet_distance(*gaussian_fit(few), *gaussian_fit(other)), rel=1e-6)
    scales_a, scales_b, shift = np.array([1.0, 3.0]), np.array([2.0, 1.0]), np.array([0.0, 2.0])
    many_a, many_b = rng.normal(0, scales_a, (40000, 2)), rng.normal(shift, scales_b, (40000, 2))
    assert fid(many_a, many_b) == pytest.approx((shift ** 2).sum() + ((scales_a - scales_b) ** 2).sum(), rel=0.03)


def test_kid_is_unbiased_near_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 32)), rng.normal(size=(300, 32))
    same, shifted = kid(a, b, subset_size=100, subsets=20), kid(a, b + 0.5, subset_size=100, subsets=20)
    assert abs(same) < 0.03 and shifted > 0.5  # a shift of half a standard deviation per feature: MMD² near 1
    x, y = rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    k = lambda u, v: (u @ v / 2 + 1) ** 3
    by_hand = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
               - 2 * sum(k(x[i], y[j]) for i in range(4) for j in range(4)) / 16)
    assert kid(x, y) == pytest.approx(by_hand, rel=1e-12)
    with pytest.raises(AnimePoseError, match='at least 2'): kid(x[:1], y)


def test_lpips_is_zero_for_an_image_with_itself_symmetric_and_grows_with_damage(weights):
    model = load_lpips(weights / 'alexnet.pth', weights / 'alex_linear.safetensors')
    image = _random_image(0)
    blurred, blank = image.resize((16, 16)).resize((64, 64)), Image.new('RGB', (64, 64), 'white')
    assert lpips([image], [image], model)[0] == 0.0
    forward, backward = lpips([image, blurred], [blurred, image], model)
    assert forward == pytest.approx(backward, rel=1e-6) and 0 < forward < lpips([blank], [image], model)[0]
    with pytest.raises(AnimePoseError, match='no LPIPS linear layers'): load_lpips(weights / 'alexnet.pth')
    with pytest.raises(AnimePoseError, match='no torchvision backbone'): load_lpips(weights / 'alex_linear.safetensors')


def test_lpips_tells_vgg_from_alexnet_in_one_file(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import vgg16
    with torch.device('meta'): shapes = vgg16(weights=None).features.state_dict()
    backbone = {f'features.{k}': torch.randn(v.shape) * 0.05 for k, v in shapes.items()}
    linear = {f'lin{i}.model.1.weight': torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS_NETS['vgg'][1])}
    save_file({**backbone, **linear}, tmp_path / 'vgg_lpips.safetensors')
    model = load_lpips(tmp_path / 'vgg_lpips.safetensors')
    assert len(model.slices) == 5 and model.linear4.shape == (1, 512, 1, 1)
    image = _random_image(1, 32)
    assert lpips([image], [image], model)[0] == 0.0 and lpips([image], [Image.new('RGB', (32, 32))], model)[0] > 0


def test_inception_features_from_a_torchvision_state_dict(weights, tmp_path):
    inception = load_inception(weights / 'inception.pth', image_size=75)  # AuxLogits and fc in the file are not used
    images = [_random_image(seed, 32) for seed in range(3)]
    features = inception(images)
    assert features.shape == (3, 2048) and np.isfinite(features).all()
    assert abs(fid(features, features)) < 1e-6 and fid(features, inception([Image.new('RGB', (32, 32))] * 3)) > 0
    torch.save({'features.0.weight': torch.zeros(1)}, tmp_path / 'other.pth')
    with pytest.raises(AnimePoseError, match='not torchvision inception_v3 weights'): load_inception(tmp_path / 'other.pth')


def test_image_encoder_round_trip_cosines_and_errors(weights, tmp_path):
    encoder = load_image_encoder(weights / 'clip')
    image, other = _random_image(0), Image.new('RGB', (64, 64), 'white')
    similarity = embedding_similarity([image, other], [image, image], encoder)
    assert similarity[0] == pytest.approx(1.0, abs=1e-5) and similarity[1] < similarity[0]
    assert encoder([image, other, image]).shape == (3, 16)
    with pytest.raises(AnimePoseError, match='expected a transformers vision model directory'): load_image_encoder(tmp_path / 'none')
    (tmp_path / 'config_only').mkdir(); (tmp_path / 'config_only' / 'config.json').write_text('{}')
    with pytest.raises(AnimePoseError, match='no safetensors weights'): load_image_encoder(tmp_path / 'config_only')


def test_image_encoder_takes_any_vision_model_with_a_pooler_output(tmp_path):
    from transformers import Dinov2Config, Dinov2Model
    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                             patch_size=8)).save_pretrained(tmp_path / 'dino')
    encoder = load_image_encoder(tmp_path / 'dino')
    assert type(encoder.model).__name__ == 'Dinov2Model' and encoder([_random_image(0)]).shape == (1, 32)


def test_learned_metrics_name_what_is_missing(weights, tmp_path):
    nothing = load_learned_metrics()
    assert set(nothing.unavailable) == {'identity_cosine, reference_cosine', 'lpips', 'fid, kid'}
    assert nothing.unavailable['fid, kid'] == FID_HELP and '--lpips-weights' in nothing.unavailable['lpips']
    absent = load_learned_metrics(lpips_weights=[weights / 'alexnet.pth', tmp_path / 'gone.pth'])
    assert absent.lpips is None and absent.unavailable['lpips'].startswith(f"'{tmp_path / 'gone.pth'}' not found")
    with pytest.raises(AnimePoseError, match='not torchvision inception_v3'): load_learned_metrics(fid_weights=weights / 'alexnet.pth')


def test_synthetic_metrics_keep_their_keys_and_gain_learned_ones(weights, triples):
    learned = LearnedMetrics(encoder=load_image_encoder(weights / 'clip'))
    methods = {'perfect': lambda t: t['target'], 'copy_reference': lambda t: t['reference']}
    metrics, _ = evaluate_methods(methods, triples[:2], SyntheticParser(), PART_LABELS, progress=False, learned=learned)
    assert list(metrics['perfect']) == [*METRICS, 'identity_cosine', 'reference_cosine']
    assert metrics['perfect']['identity_cosine'] == pytest.approx(1.0, abs=1e-5)
    assert metrics['copy_reference']['reference_cosine'] == pytest.approx(1.0, abs=1e-5)


def test_real_triples_are_scored_through_a_detector(triples):
    rows = [{k: v for k, v in row.items() if k != 'masks'} for row in triples[:2]]
    found = Pose(np.asarray(rows[0]['pose'], np.float32), 64, 64)
    class Fixed:
        def __init__(self, poses): self.poses = poses
        def detect(self, image): return self.poses
    assert score_real([rows[0]['target']], rows[:1], Fixed([found]))[0]['pck'] == 1.0
    assert score_real([rows[0]['target']], rows[:1], Fixed([]))[0] == pytest.approx(
        dict(pck=0.0, oks=0.0, detected=0.0, ssim=1.0, psnr=float('inf')))
    assert list(score_real([r['reference'] for r in rows], rows)[0]) == ['ssim', 'psnr']


def test_detector_directories(tmp_path):
    from anime_pose.core import bundled_path
    assert isinstance(load_detector(bundled_path('parser')), ParserDetector)
    with pytest.raises(AnimePoseError, match='no such detector directory'): load_detector(tmp_path / 'none')
    with pytest.raises(AnimePoseError, match='body_pose_model.pth'): load_detector(tmp_path)  # OpenPose weights missing


def test_vae_reconstruction_rebuilds_targets_of_any_size_and_is_never_marked_best():
    "The bundled VAE gives back a held-out target far closer than A's reference is, at the target's own size."
    from anime_pose.core import bundled_path
    from anime_pose.evaluate import CEILINGS, vae_reconstruction
    from diffusers import AutoencoderKL
    rebuild = vae_reconstruction(AutoencoderKL.from_pretrained(bundled_path('model') / 'vae'), batch_size=2)
    rows = list(synthetic_dataset(3, 2, 64, seed=11, progress=False)['test'])
    odd = dict(rows[0], target=load_image(rows[0]['target']).resize((70, 50)))  # not a multiple of the VAE's factor
    images = rebuild.batch([*rows, odd])
    assert [image.size for image in images] == [(64, 64)] * len(rows) + [(70, 50)]
    error = lambda image, row: np.abs(np.asarray(image, np.float32) - np.asarray(load_image(row['target']).convert('RGB'), np.float32)).mean()
    for image, row in zip(images, rows):
        assert error(image, row) < error(load_image(row['reference']).convert('RGB'), row) / 3
    single = np.asarray(rebuild(rows[1]), np.int16)  # one at a time as in a batch (to the rounding of a sum)
    assert np.abs(single - np.asarray(images[1], np.int16)).max() <= 1
    table = metrics_table({'vae_reconstruction': dict(ssim=0.9), 'a': dict(ssim=0.5)})
    assert 'vae_reconstruction' in CEILINGS and '| vae_reconstruction | 0.900 |' in table and '| a | **0.500** |' in table


def test_metrics_table_copes_with_missing_and_extra_columns():
    table = metrics_table({'ground_truth': dict(ssim=1.0, psnr=float('inf'), fid=0.0),
                           'a': dict(ssim=0.5, psnr=20.0, fid=30.0, kid=0.01), 'b': dict(ssim=0.6, psnr=float('nan'), fid=40.0)})
    lines = table.splitlines()
    assert lines[0] == '| method | ssim ↑ | psnr ↑ | fid ↓ | kid ↓ |'
    assert '| ground_truth | 1.000 | inf | 0.00 | – |' in lines and '| a | 0.500 | **20.00** | **30.00** | **0.0100** |' in lines
    assert '| b | **0.600** | nan | 40.00 | – |' in lines


@pytest.fixture(scope='module')
def real_run(tmp_path_factory):
    "A training run (the bundled tiny model) whose data are triples without part masks, as Danbooru triples come."
    import shutil
    from anime_pose.core import bundled_path
    from anime_pose.demo import load_recipe
    root = tmp_path_factory.mktemp('real')
    data = synthetic_dataset(10, 2, 64, seed=5, progress=False).remove_columns('masks')
    data.save_to_disk(str(root / 'data'))
    run = root / 'run'
    shutil.copytree(bundled_path('model'), run / 'final')
    shutil.copy(bundled_path('model') / 'losses.csv', run / 'losses.csv')
    (run / 'config.json').write_text(json.dumps({**load_recipe()['anime_pose']['config'], 'data': str(root / 'data')}))
    return run


def _evaluate(*args):
    from anime_pose.cli import main
    return main(['evaluate', *map(str, args), '--count', '2', '--steps', '1'])


def test_evaluate_cli_on_real_data_without_weights_says_what_is_not_measured(real_run, tmp_path, capsys):
    from anime_pose.core import bundled_path
    assert _evaluate('--model', real_run, '--out', tmp_path / 'report', '--parser', bundled_path('parser')) == 0
    err = capsys.readouterr().err
    assert f'not measured: fid, kid: {FID_HELP}' in err and 'not measured: pck, oks: needs a pose detector; pass --detector DIR' in err
    assert 'not used: --parser: triples without part masks are scored by the pose detector' in err
    metrics = json.loads((tmp_path / 'report' / 'metrics.json').read_text())
    assert set(metrics) == {'ground_truth', 'vae_reconstruction', 'copy_reference', 'warp_reference', 'pose_only', 'reference_only', 'anime_pose'}
    assert all(set(_points(row)) == {'ssim', 'psnr'} for row in metrics.values())
    report = (tmp_path / 'report' / 'report.md').read_text()
    assert '## Not measured' in report and '- lpips: needs LPIPS weights' in report and 'the ceiling the pose detector allows' in report


def test_evaluate_cli_on_synthetic_data_says_the_detector_is_not_used(tmp_path, capsys):
    "Synthetic triples carry part masks, so the synthetic parser scores them: a --detector given anyway is named as unused. A run without losses.csv still evaluates."
    import shutil
    from anime_pose.core import bundled_path
    from anime_pose.demo import load_recipe
    run = tmp_path / 'run'
    shutil.copytree(bundled_path('model'), run / 'final')
    (run / 'config.json').write_text(json.dumps({**load_recipe()['anime_pose']['config'], 'synthetic_characters': 6}))
    assert _evaluate('--model', run, '--out', tmp_path / 'report', '--detector', bundled_path('parser')) == 0
    assert 'not used: --detector: triples with part masks are scored by the synthetic parser' in capsys.readouterr().err
    assert {'pck', 'silhouette_iou', 'identity_error'} <= set(json.loads((tmp_path / 'report' / 'metrics.json').read_text())['anime_pose'])
    assert '## Training and test loss' not in (tmp_path / 'report' / 'report.md').read_text()  # the run has no losses.csv to plot


def test_evaluate_cli_on_real_data_with_every_learned_metric(real_run, weights, tmp_path):
    from anime_pose.core import bundled_path
    assert _evaluate('--model', real_run, '--out', tmp_path / 'report', '--detector', bundled_path('parser'),
                     '--identity-encoder', weights / 'clip', '--lpips-weights', weights / 'alexnet.pth', weights / 'alex_linear.safetensors',
                     '--fid-weights', weights / 'inception.pth') == 0
    metrics = json.loads((tmp_path / 'report' / 'metrics.json').read_text())
    expected = ['pck', 'oks', 'detected', 'ssim', 'psnr', 'identity_cosine', 'reference_cosine', 'lpips', 'fid', 'kid']
    assert all(list(_points(row)) == expected for row in metrics.values())
    assert 'fid_low' not in metrics['anime_pose'] and 'lpips_low' in metrics['anime_pose']  # set-level: no interval
    truth = metrics['ground_truth']
    assert truth['lpips'] == 0.0 and truth['identity_cosine'] == pytest.approx(1.0, abs=1e-5) and abs(truth['fid']) < 1e-6
    assert metrics['copy_reference']['reference_cosine'] == pytest.approx(1.0, abs=1e-5)
    assert '## Not measured' not in (tmp_path / 'report' / 'report.md').read_text()


def test_evaluate_cli_refuses_weights_that_are_not_what_they_claim(real_run, weights, tmp_path, capsys):
    assert _evaluate('--model', real_run, '--out', tmp_path / 'report', '--fid-weights', weights / 'alexnet.pth') == 1
    err = capsys.readouterr().err.strip()
    assert 'not torchvision inception_v3 weights' in err and len(err.splitlines()) == 1 and not (tmp_path / 'report').exists()
    assert _evaluate('--model', real_run, '--out', tmp_path / 'report', '--identity-encoder', tmp_path / 'nothing') == 1
    assert 'expected a transformers vision model directory' in capsys.readouterr().err and not (tmp_path / 'report').exists()


def test_a_single_triple_leaves_fid_and_kid_unmeasured_instead_of_failing(real_run, weights, tmp_path):
    from anime_pose.train import load_config
    learned = LearnedMetrics(inception=load_inception(weights / 'inception.pth', image_size=75))
    metrics = evaluate_models(tmp_path / 'report', real_run / 'final', load_config(real_run / 'config.json'), count=1,
                              num_inference_steps=1, progress=False, learned=learned)
    assert all(set(_points(row)) == {'ssim', 'psnr'} for row in metrics.values())
    assert '- fid, kid: need at least 2 triples' in (tmp_path / 'report' / 'report.md').read_text()


# --- calibrating how a model draws (ControlNet scale, guidance) ---

def _synthetic_run(tmp_path, characters=10):
    "A training run directory holding the bundled model, trained (as far as its config says) on `characters` synthetic characters."
    import shutil
    from anime_pose.core import bundled_path
    from anime_pose.demo import load_recipe
    run = tmp_path / 'run'
    shutil.copytree(bundled_path('model'), run / 'final')
    (run / 'config.json').write_text(json.dumps({**load_recipe()['anime_pose']['config'], 'synthetic_characters': characters}))
    return run


def test_calibrate_cli_stores_the_chosen_settings_where_the_pipeline_finds_them(tmp_path, capsys):
    from anime_pose.cli import main
    from anime_pose.pipeline import PoseTransferPipeline
    run = _synthetic_run(tmp_path)
    assert main(['calibrate', '--model', str(run), '--scales', '3', '1', '--guidances', '2', '1', '--noise-scales', '1', '0.8',
                 '--count', '2', '--steps', '2']) == 0
    out = capsys.readouterr().out
    stored = json.loads((run / 'final' / 'model_index.json').read_text())
    scale, guidance, noise = stored['controlnet_conditioning_scale'], stored['guidance_scale'], stored['noise_scale']
    assert scale in (1.0, 3.0) and guidance in (1.0, 2.0) and noise in (1.0, 0.8)
    assert f'ControlNet scale {scale:g}, guidance {guidance:g} and noise scale {noise:g} chosen on 2 validation triples' in out
    assert all(f'| scale {s}, guidance {g} (mean rank' in out for s in (1, 3) for g in (1, 2))
    assert f'| scale {scale:g}, guidance {guidance:g}, noise 0.8 (mean rank' in out
    config = PoseTransferPipeline.from_pretrained(run / 'final').config
    assert (config.controlnet_conditioning_scale, config.guidance_scale, config.noise_scale) == (scale, guidance, noise)


def test_calibrate_tries_every_pair_and_prefers_the_gentler_one_on_a_tie_whatever_the_model_stored(tmp_path, monkeypatch):
    import anime_pose.calibrate as calibration
    from anime_pose.train import load_config
    from anime_pose.pipeline import set_drawing_defaults
    run = _synthetic_run(tmp_path)
    scores = {f'scale {s}, guidance {g}': dict(pck=.1 * s + .01 * g, ssim=.5) for s in (1, 2, 3, 4) for g in (1, 5)}
    scores['scale 4, guidance 5'] = scores['scale 3, guidance 5'] = dict(pck=.9, ssim=.7)  # the best, tied
    drawn = []
    def evaluate_methods(methods, *args, **kwargs):
        drawn.extend(methods)
        return {name: scores[name] for name in methods}, {}
    monkeypatch.setattr(calibration, 'evaluate_methods', evaluate_methods)
    chosen = []
    for stored_guidance in (5, 1):  # the search does not start from what the model stored
        set_drawing_defaults(run / 'final', controlnet_conditioning_scale=2, guidance_scale=stored_guidance)
        result = calibration.calibrate(run / 'final', load_config(run / 'config.json'), (4, 3, 2, 1), (5, 1), (1,),
                                       count=1, progress=False)
        chosen.append((result['controlnet_conditioning_scale'], result['guidance_scale']))
    assert chosen == [(3.0, 5.0), (3.0, 5.0)]
    assert result['mean_rank']['scale 3, guidance 5'] == result['mean_rank']['scale 4, guidance 5'] == 7.5
    assert sorted(drawn) == sorted(list(scores) * 2)  # every pair, each drawn once per calibration
    stored = json.loads((run / 'final' / 'model_index.json').read_text())
    assert (stored['controlnet_conditioning_scale'], stored['guidance_scale'], stored['noise_scale']) == (3.0, 5.0, 1.0)


def test_calibrate_then_tries_the_noise_scales_at_the_chosen_pair_only(tmp_path, monkeypatch):
    import anime_pose.calibrate as calibration
    from anime_pose.train import load_config
    run = _synthetic_run(tmp_path)
    scores = {'scale 1, guidance 1': dict(pck=.5, ssim=.5), 'scale 2, guidance 1': dict(pck=.8, ssim=.6),
              'scale 2, guidance 1, noise 0.8': dict(pck=.85, ssim=.65),  # better on both: chosen
              'scale 2, guidance 1, noise 0.5': dict(pck=.9, ssim=.4)}
    drawn = []
    def evaluate_methods(methods, *args, **kwargs):
        drawn.extend(methods)
        return {name: scores[name] for name in methods}, {}
    monkeypatch.setattr(calibration, 'evaluate_methods', evaluate_methods)
    config = load_config(run / 'config.json')
    result = calibration.calibrate(run / 'final', config, (1, 2), (1,), (1, 0.8, 0.5), count=1, progress=False)
    assert (result['controlnet_conditioning_scale'], result['guidance_scale'], result['noise_scale']) == (2.0, 1.0, 0.8)
    assert sorted(drawn) == sorted(scores)  # the pair at noise 1 is not drawn twice; the other pair at no other noise
    assert json.loads((run / 'final' / 'model_index.json').read_text())['noise_scale'] == 0.8
    scores['scale 2, guidance 1, noise 0.8'] = dict(pck=.8, ssim=.6)  # level with noise 1: the training noise wins the tie
    assert calibration.calibrate(run / 'final', config, (1, 2), (1,), (0.8, 1), count=1, progress=False)['noise_scale'] == 1.0


def test_calibrating_real_triples_scores_them_with_the_detector(real_run, tmp_path):
    import shutil
    from anime_pose.core import bundled_path
    from anime_pose.calibrate import calibrate
    from anime_pose.train import load_config
    run = tmp_path / 'real'
    shutil.copytree(real_run, run)
    result = calibrate(run / 'final', load_config(run / 'config.json'), (1, 2), (1,), count=2, num_inference_steps=1,
                       detector=bundled_path('parser'), progress=False)
    assert all(set(row) == {'pck', 'oks', 'detected', 'ssim', 'psnr'} for row in result['metrics'].values())
    assert json.loads((run / 'final' / 'model_index.json').read_text())['controlnet_conditioning_scale'] == result['controlnet_conditioning_scale']


def test_calibrating_real_triples_without_a_detector_is_a_one_line_error_and_changes_nothing(real_run, tmp_path, capsys):
    import shutil
    from anime_pose.cli import main
    run = tmp_path / 'real'
    shutil.copytree(real_run, run)
    before = (run / 'final' / 'model_index.json').read_text()
    assert main(['calibrate', '--model', str(run), '--count', '1', '--steps', '1']) == 1
    err = capsys.readouterr().err.strip()
    assert 'calibrating needs pose accuracy' in err and '--detector DIR' in err and len(err.splitlines()) == 1
    assert (run / 'final' / 'model_index.json').read_text() == before


# --- any saved triples dataset, bootstrap intervals, the pose-invariant identity, the reference probe ---

def test_identity_parts_error_tells_the_right_character_from_a_wrong_one_on_the_ground_truth(triples):
    labels = parse(load_parser(), [t['target'] for t in triples])[1]
    other = [next(u for u in triples[i:] + triples[:i] if u['character'] != t['character']) for i, t in enumerate(triples)]
    for triple, found, wrong in zip(triples, labels, other):
        right_error = identity_parts_error(triple['target'], found, triple['target'], np.asarray(triple['masks']), PART_LABELS)
        wrong_error = identity_parts_error(triple['target'], found, wrong['target'], np.asarray(wrong['masks']), PART_LABELS)
        assert right_error < wrong_error, (triple['character'], right_error, wrong_error)


def test_identity_parts_error_forgives_a_shift_that_identity_error_punishes(triples):
    row = triples[0]
    target, masks = np.asarray(row['target']), np.asarray(row['masks'])
    shifted, shifted_masks = np.roll(target, 3, axis=1), np.roll(masks, 3, axis=1)
    assert identity_error(Image.fromarray(shifted), row['target'], masks, PART_LABELS) > 5
    assert identity_parts_error(Image.fromarray(shifted), shifted_masks, row['target'], masks, PART_LABELS) == pytest.approx(0.0, abs=1e-9)


def test_bootstrap_intervals_hold_the_mean_and_are_reproducible():
    values = np.random.default_rng(3).exponential(5, 30)
    low, high = bootstrap_interval(values)
    assert low < values.mean() < high and bootstrap_interval(values) == (low, high)
    assert bootstrap_interval([1.0, np.nan, 3.0])[0] >= 1.0 and np.isnan(bootstrap_interval([np.nan, np.nan])[0])


@pytest.fixture(scope='module')
def seed7(tmp_path_factory):
    "`anime-pose synth` output drawn with another seed than any run's data: a test split of 2 characters."
    from anime_pose.cli import main
    out = tmp_path_factory.mktemp('seed7') / 'data'
    assert main(['synth', '--out', str(out), '--seed', '7', '--characters', '15', '--poses-per-character', '2']) == 0
    return out


def test_evaluate_cli_scores_another_datasets_whole_split_with_intervals_and_the_probe(seed7, tmp_path, capsys):
    import datasets
    from anime_pose.cli import main
    run = _synthetic_run(tmp_path)
    test_split = datasets.load_from_disk(str(seed7))['test']
    assert main(['evaluate', '--model', str(run), '--data', str(seed7), '--count', 'all', '--steps', '1', '--probe',
                 '--out', str(tmp_path / 'report')]) == 0
    assert 'reference-information probe' in capsys.readouterr().out
    metrics = json.loads((tmp_path / 'report' / 'metrics.json').read_text())
    probe = metrics.pop('reference_probe')
    assert set(metrics) == {'ground_truth', 'vae_reconstruction', 'copy_reference', 'warp_reference', 'pose_only', 'reference_only', 'anime_pose'}
    for name, row in metrics.items():
        assert list(_points(row)) == list(METRICS)
        for metric in METRICS:
            low, value, high = row[f'{metric}_low'], row[metric], row[f'{metric}_high']
            assert low <= value <= high, (name, metric, low, value, high)
    assert metrics['ground_truth']['identity_error_high'] == 0.0
    assert metrics['ground_truth']['identity_parts_error'] < metrics['reference_only']['identity_parts_error']
    assert probe['triples'] == len(test_split) and all(np.isfinite(probe[k]) for k in ('none', 'own', 'other', 'target', 'own_gain'))
    report = (tmp_path / 'report' / 'report.md').read_text()
    assert f'{len(test_split)} triples of the test split of `{seed7}`' in report and '95% bootstrap interval' in report
    assert '## Reference-information probe' in report and '| ground_truth | 0.' in report and ' [' in report


def test_evaluate_cli_checks_the_data_first_in_one_line(seed7, tmp_path, capsys):
    from anime_pose.cli import main
    run = _synthetic_run(tmp_path)
    (tmp_path / 'plain').mkdir()
    cases = [(['--data', str(tmp_path / 'absent')], 'no such directory'), (['--data', str(tmp_path / 'plain')], 'not a saved DatasetDict'),
             (['--data', str(seed7), '--split', 'holdout'], 'no holdout split (it has train, validation, test); pass --split')]
    for flags, message in cases:
        assert main(['evaluate', '--model', str(run), *flags, '--out', str(tmp_path / 'report')]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and not (tmp_path / 'report').exists()
    with pytest.raises(SystemExit): main(['evaluate', '--model', str(run), '--count', 'none', '--out', str(tmp_path / 'report')])


def test_reference_probe_gives_four_finite_numbers_and_the_gain(seed7):
    import datasets
    from anime_pose.core import bundled_path
    from anime_pose.evaluate import reference_probe
    from anime_pose.pipeline import PoseTransferPipeline
    rows = list(datasets.load_from_disk(str(seed7))['test'])
    probe = reference_probe(PoseTransferPipeline.from_pretrained(bundled_path('model')), rows, draws=1)
    assert list(probe) == ['none', 'own', 'other', 'target', 'own_gain']
    assert all(np.isfinite(v) and v > 0 for k, v in probe.items() if k != 'own_gain')
    assert probe['own_gain'] == pytest.approx((probe['none'] - probe['own']) / probe['none'])

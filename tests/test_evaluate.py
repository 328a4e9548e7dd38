"Evaluation: metrics on constructed cases, the parser's decoding, the report, and the CLI's errors."
import json

import numpy as np
import pytest
import torch
from PIL import Image

from anime_pose.core import AnimePoseError
from anime_pose.evaluate import (METRICS, MIRRORED, SyntheticParser, _mirror, evaluate_methods, heatmap_keypoints,
                                 identity_error, load_parser, metrics_table, psnr, silhouette_iou, ssim,
                                 write_report)
from anime_pose.pose import keypoint_heatmaps
from anime_pose.synthetic import PART_LABELS, synthetic_dataset


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
    from anime_pose.evaluate import METHODS, demo
    metrics = demo(tmp_path / 'demo', count=2, num_inference_steps=2, progress=False)
    assert set(METHODS) <= set(metrics) and all(set(metrics[m]) == set(METRICS) for m in METHODS)
    written = json.loads((tmp_path / 'demo' / 'metrics.json').read_text())
    assert written == metrics
    report = (tmp_path / 'demo' / 'report.md').read_text()
    assert all(f'| {m} |' in report for m in METHODS) and 'losses_anime_pose.png' in report
    assert (tmp_path / 'demo' / 'losses_gan.png').is_file()


def test_bundled_models_were_trained_on_the_same_characters():
    from anime_pose.evaluate import load_recipe
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
    from anime_pose.evaluate import evaluate_models, load_recipe, retrain_models
    from anime_pose.train import TrainConfig, override_config
    recipe = load_recipe()
    shrink = dict(synthetic_characters=6, max_steps=2, base_steps=2, validate_every=1, sample_every=0, checkpoint_every=0)
    small = {'anime_pose': {'config': {**recipe['anime_pose']['config'], **shrink}},
             'gan': {'config': {**recipe['gan']['config'], **shrink}},
             'parser': dict(characters=6, poses_per_character=2, steps=2, batch_size=4, seed=1)}
    models = retrain_models(tmp_path / 'models', small, progress=False)
    assert all((models / name).is_dir() for name in ('model', 'gan', 'parser'))
    assert (models / 'model' / 'losses.csv').is_file() and (models / 'model' / 'model_index.json').is_file()
    config = override_config(TrainConfig(), small['anime_pose']['config'], 'test')
    metrics = evaluate_models(tmp_path / 'report', models / 'model', config, models / 'gan', models / 'parser',
                              {'anime_pose': models / 'model'}, count=1, num_inference_steps=1, progress=False)
    assert set(metrics) == {'ground_truth', 'copy_reference', 'pose_only', 'reference_only', 'gan', 'anime_pose'}

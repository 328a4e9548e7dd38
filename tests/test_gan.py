"The GAN baseline: shapes, losses, learning on a tiny batch, save/load, and training through `anime-pose train`."
import numpy as np
import pytest
import torch
from PIL import Image

from anime_pose.core import AnimePoseError
from anime_pose.gan import (GanConfig, GanTransfer, PatchDiscriminator, PoseTransferGenerator, build_gan, discriminator_loss,
                            gan_config, gan_step, generator_adversarial_loss, load_gan, pose_condition)
from anime_pose.pose import keypoint_heatmaps


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny convolutions gain nothing from threads, and on a shared CPU (pytest -n 2) threads contend badly."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def keypoints(seed=0):
    rng = np.random.default_rng(seed)
    points = rng.uniform(0.15, 0.85, (18, 3)).astype(np.float32)
    points[:, 2] = 1
    points[[14, 15], 2] = 0  # the eyes are missing
    return points


def tiny_batch(n=2, size=32, seed=0):
    "A batch whose target depends on the pose, so a generator can only fit it by reading the pose."
    generator = torch.Generator().manual_seed(seed)
    poses = [keypoints(seed + i) for i in range(n)]
    pose = pose_condition(np.stack(poses), size)
    reference = torch.rand(n, 3, size, size, generator=generator) * 2 - 1
    target = (reference * 0.5 + pose[:, :3] - 0.5).clamp(-1, 1)
    return dict(reference=reference, target=target, pose=pose)


@pytest.mark.parametrize('pose_input,channels', [('skeleton', 3), ('heatmaps', 18), ('both', 21)])
def test_generator_and_discriminator_shapes(pose_input, channels):
    generator = PoseTransferGenerator(pose_input=pose_input, sample_size=32, base_channels=8, n_blocks=2)
    discriminator = PatchDiscriminator(pose_input=pose_input, base_channels=8)
    reference, pose = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, channels, 32, 32)
    fake = generator(reference, pose)
    assert fake.shape == (3, 3, 32, 32) and fake.abs().max() <= 1
    assert discriminator(fake, reference, pose).shape == (3, 1, 6, 6)
    assert pose_condition(keypoints(), 32, pose_input).shape == (channels, 32, 32)


def test_generator_output_depends_on_the_pose_and_the_reference():
    generator = PoseTransferGenerator(sample_size=32, base_channels=8).eval()
    reference = torch.rand(1, 3, 32, 32) * 2 - 1
    pose_a, pose_b = (pose_condition(keypoints(s), 32)[None] for s in (1, 2))
    with torch.no_grad():
        assert not torch.allclose(generator(reference, pose_a), generator(reference, pose_b))
        assert not torch.allclose(generator(reference, pose_a), generator(-reference, pose_a))


def test_heatmaps_peak_at_the_keypoints_and_skip_missing_ones():
    points = keypoints()
    maps = keypoint_heatmaps(points, 40)
    for joint in (0, 4, 10):
        row, col = divmod(int(maps[joint].argmax()), 40)
        assert abs(col - points[joint, 0] * 40 + 0.5) <= 1 and abs(row - points[joint, 1] * 40 + 0.5) <= 1
    assert maps[14].sum() == 0 and maps[15].sum() == 0


def test_bad_inputs_are_refused_with_a_reason():
    with pytest.raises(AnimePoseError, match='pose_input must be one of'): PoseTransferGenerator(pose_input='depth')
    with pytest.raises(AnimePoseError, match=r'pose must be \(18, 3\)'): pose_condition(np.zeros((17, 3)), 32)
    with pytest.raises(AnimePoseError, match='adversarial loss must be one of'): discriminator_loss(torch.ones(1), torch.ones(1), 'wgan')
    with pytest.raises(AnimePoseError, match="unknown GAN option 'blocks'"): gan_config({'blocks': 2})
    with pytest.raises(AnimePoseError, match='l1_weight=.ten. should be of type float'): gan_config({'l1_weight': 'ten'})
    with pytest.raises(AnimePoseError, match='must be zero or more'): gan_config({'cycle_weight': -1.0})
    with pytest.raises(AnimePoseError, match='must be a multiple of 2\\*\\*n_down'): build_gan(GanConfig(n_down=3), 36)


@pytest.mark.parametrize('kind', ['hinge', 'lsgan'])
def test_adversarial_losses_reward_the_right_side(kind):
    real, fake = torch.full((2, 1, 4, 4), 1.5), torch.full((2, 1, 4, 4), -1.5)
    assert discriminator_loss(real, fake, kind) < discriminator_loss(fake, real, kind)
    assert generator_adversarial_loss(real, kind) < generator_adversarial_loss(fake, kind)
    assert discriminator_loss(real, fake, kind) >= 0


def test_a_few_steps_reduce_l1_on_a_tiny_batch():
    torch.manual_seed(0)
    gan = GanConfig(generator_channels=8, n_blocks=2, discriminator_channels=8)
    generator, discriminator = build_gan(gan, 32)
    optimizers = {'generator': torch.optim.Adam(generator.parameters(), 2e-3, betas=(0.5, 0.999)),
                  'discriminator': torch.optim.Adam(discriminator.parameters(), 2e-3, betas=(0.5, 0.999))}
    def update(name):
        optimizers[name].step(); optimizers[name].zero_grad(set_to_none=True)
    batch = tiny_batch()
    l1 = [gan_step(generator, discriminator, batch, gan, update=update)['l1'].item() for _ in range(40)]
    assert np.mean(l1[-5:]) < 0.6 * l1[0]


def test_discriminator_learns_to_separate_real_from_generated():
    torch.manual_seed(0)
    gan = GanConfig(generator_channels=8, n_blocks=1, discriminator_channels=8, l1_weight=0.0, adversarial_weight=0.0)
    generator, discriminator = build_gan(gan, 32)
    optimizer = torch.optim.Adam(discriminator.parameters(), 2e-3, betas=(0.5, 0.999))
    def update(name):
        if name == 'discriminator': optimizer.step()
        optimizer.zero_grad(set_to_none=True); generator.zero_grad(set_to_none=True)
    batch = tiny_batch()
    losses = [gan_step(generator, discriminator, batch, gan, update=update)['discriminator'].item() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def test_save_load_round_trip(tmp_path):
    generator = PoseTransferGenerator(sample_size=32, base_channels=8, n_blocks=1)
    for p in generator.parameters(): p.data.normal_(0, 0.1)
    generator.save_pretrained(tmp_path / 'run/final/generator')
    assert (tmp_path / 'run/final/generator/diffusion_pytorch_model.safetensors').exists()
    reference = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    expected = GanTransfer(generator).generate(reference, keypoints())
    for path in (tmp_path / 'run', tmp_path / 'run/final', tmp_path / 'run/final/generator'):
        drawn = load_gan(path).generate(reference, keypoints())
        assert drawn.size == (30, 40) and np.array_equal(np.asarray(drawn), np.asarray(expected))


def test_load_gan_names_what_is_missing(tmp_path):
    with pytest.raises(AnimePoseError, match='no such directory'): load_gan(tmp_path / 'absent')
    (tmp_path / 'config.json').write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(AnimePoseError, match='no GAN generator found'): load_gan(tmp_path)


SMALL = '{"generator_channels": 8, "n_blocks": 1, "discriminator_channels": 8, "discriminator_layers": 2}'


def train_args(out, *extra):
    return ['train', '--method', 'gan', '--config', 'tiny', '--out', str(out), '--max-steps', '4', '--batch-size', '2',
            '--checkpoint-every', '2', '--set', 'synthetic_characters=3', '--set', 'resolution=32', '--set', f'options={SMALL}',
            '--set', 'validate_every=2', '--set', 'sample_every=4', *extra]


def test_anime_pose_train_method_gan(tmp_path, capsys):
    from anime_pose.cli import main
    from anime_pose.train import read_losses
    assert main(train_args(tmp_path / 'run')) == 0
    assert 'trained 4 steps' in capsys.readouterr().out
    rows = read_losses(tmp_path / 'run')
    assert [r['step'] for r in rows if r['split'] == 'train'] == [1, 2, 3, 4]
    assert [r['step'] for r in rows if r['split'] == 'test'] == [0, 2, 4]
    assert (tmp_path / 'run/final/generator/diffusion_pytorch_model.safetensors').exists()
    assert (tmp_path / 'run/samples/step-000004.png').exists()
    drawn = load_gan(tmp_path / 'run').generate(Image.new('RGB', (50, 40), 'white'), keypoints())
    assert drawn.size == (50, 40)


def test_gan_dry_run_reports_both_networks(capsys):
    from anime_pose.cli import main
    assert main(['train', '--method', 'gan', '--dry-run', '--set', f'options={SMALL}']) == 0
    out = capsys.readouterr().out
    assert 'generator' in out and 'discriminator' in out and 'parameters' in out


def test_bad_gan_options_are_one_line_errors(tmp_path, capsys):
    from anime_pose.cli import main
    assert main(train_args(tmp_path / 'run', '--set', 'options={"adversarial": "wgan"}')) == 1
    assert 'adversarial loss must be one of' in capsys.readouterr().err


def test_killed_run_resumes_to_identical_weights(tmp_path):
    from safetensors.torch import load_file
    from anime_pose.gan import GANMethod
    from anime_pose.train import load_config, override_config, read_losses, train
    config = override_config(load_config('tiny'), dict(method='gan', synthetic_characters=3, resolution=32, max_steps=6, batch_size=2,
                                                        checkpoint_every=2, validate_every=3, sample_every=0, options=SMALL))

    class Crashing(GANMethod):
        def training_step(self, batch):
            if len(self.history) == 4: raise RuntimeError('killed in step 5')
            return super().training_step(batch)

    train(config, tmp_path / 'straight', method=GANMethod, progress=False)
    with pytest.raises(RuntimeError, match='killed'): train(config, tmp_path / 'killed', method=Crashing, progress=False)
    train(config, tmp_path / 'killed', resume=True, method=GANMethod, progress=False)
    for name in ('generator', 'discriminator'):
        a, b = (load_file(tmp_path / run / f'final/{name}/diffusion_pytorch_model.safetensors') for run in ('straight', 'killed'))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_losses(tmp_path / 'killed') == read_losses(tmp_path / 'straight')


def test_cycle_term_needs_the_reference_pose(tmp_path):
    import datasets
    from anime_pose.core import triple_features
    from anime_pose.train import load_config, override_config, train
    from anime_pose.gan import GANMethod
    row = dict(reference=Image.new('RGB', (32, 32)), target=Image.new('RGB', (32, 32)), pose=keypoints(), character='a', tags=['1girl'])
    split = datasets.Dataset.from_list([row] * 2, features=triple_features())
    datasets.DatasetDict(train=split, test=split).save_to_disk(str(tmp_path / 'triples'))
    options = dict(generator_channels=8, n_blocks=1, discriminator_channels=8, cycle_weight=1.0)
    config = override_config(load_config('tiny'), dict(method='gan', data=str(tmp_path / 'triples'), resolution=32, max_steps=1,
                                                        batch_size=2, options=options))
    with pytest.raises(AnimePoseError, match="cycle_weight > 0 needs triples with a 'reference_pose' column"):
        train(config, tmp_path / 'run', method=GANMethod, progress=False)


def test_synthetic_triples_feed_the_cycle_term():
    from anime_pose.gan import GanData
    from anime_pose.synthetic import synthetic_dataset
    triples = synthetic_dataset(3, 2, 32, progress=False)['train']
    data = GanData(triples, 32)
    batch = data.batch([0, 1])
    assert data.has_reference_pose and batch['reference_pose'].shape == batch['pose'].shape == (2, 21, 32, 32)
    assert not torch.equal(batch['reference_pose'], batch['pose'])  # two drawings of a character in different poses
    assert batch['reference'].min() >= -1 and batch['reference'].max() <= 1
    gan = GanConfig(generator_channels=8, n_blocks=1, discriminator_channels=8, cycle_weight=2.0)
    generator, discriminator = build_gan(gan, 32)
    losses = gan_step(generator, discriminator, batch, gan)
    assert {'cycle', 'l1', 'adversarial', 'discriminator'} <= set(losses)
    torch.testing.assert_close(losses['generator'], losses['adversarial'] + 10 * losses['l1'] + 2 * losses['cycle'])

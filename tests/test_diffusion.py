"DDPM from scratch (anime_pose.diffusion) against diffusers, plus bad inputs and the study's plumbing."
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from anime_pose.core import AnimePoseError
from anime_pose.diffusion import (BETA_SCHEDULES, DIFFUSERS_SCHEDULES, LOSSES, PREDICTIONS, DiffusionError, NoiseSchedule, SelfAttention,
                                  SinusoidalTimeEmbedding, TinyUNet, diffusion_loss, frechet_distance, frechet_random_feature_distance,
                                  gaussian_fit, held_out_losses, loss_study, p_step, predict_x0, q_posterior, q_sample, sample,
                                  sampling_timesteps, study_table, train_denoiser, training_target, velocity)


def randn(*shape, seed=0): return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('name', list(BETA_SCHEDULES))
@pytest.mark.parametrize('timesteps', [10, 1000])
def test_schedules_equal_diffusers(name, timesteps):
    ours, theirs = NoiseSchedule.from_name(name, timesteps), DDPMScheduler(timesteps, beta_schedule=DIFFUSERS_SCHEDULES[name])
    torch.testing.assert_close(ours.betas, theirs.betas, atol=1e-7, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, atol=1e-6, rtol=0)


def test_schedule_is_a_module_whose_constants_follow_it():
    schedule = NoiseSchedule.from_name('cosine', 50).to(torch.float64)
    assert len(schedule) == 50 and schedule.alphas_cumprod.dtype == torch.float64
    assert schedule.state_dict() == {}  # constants are derived, not saved with a model
    assert 0 < schedule.alphas_cumprod[-1] < schedule.alphas_cumprod[0] < 1


@pytest.mark.parametrize('betas, message', [(torch.tensor([0.1]), 'at least 2'), (torch.zeros(2, 3), '1-d'),
                                            (torch.tensor([0.0, 0.1]), 'strictly between'), (torch.tensor([0.5, 1.5]), 'strictly between')])
def test_bad_betas(betas, message):
    with pytest.raises(DiffusionError, match=message): NoiseSchedule(betas)


def test_unknown_names_are_user_errors_listing_the_choices():
    with pytest.raises(AnimePoseError, match="unknown beta schedule 'laplace'; expected one of 'linear'"): NoiseSchedule.from_name('laplace')
    x = randn(2, 3, 4, 4)
    schedule = NoiseSchedule.from_name('linear', 10)
    with pytest.raises(DiffusionError, match="unknown prediction 'sample'"): training_target(schedule, x, x, 1, 'sample')
    with pytest.raises(DiffusionError, match="unknown prediction 'x0'"): predict_x0(schedule, x, 1, x, 'x0')
    with pytest.raises(DiffusionError, match="unknown loss 'mse'"): diffusion_loss(TinyUNet(width=8, multipliers=(1,)), schedule, x, 'mse')


@pytest.mark.parametrize('name', list(BETA_SCHEDULES))
def test_forward_process_and_velocity_equal_diffusers(name):
    ours, theirs = NoiseSchedule.from_name(name), DDPMScheduler(1000, beta_schedule=DIFFUSERS_SCHEDULES[name])
    x0, noise, t = randn(5, 3, 8, 8).clamp(-1, 1), randn(5, 3, 8, 8, seed=1), torch.tensor([0, 1, 250, 998, 999])
    torch.testing.assert_close(q_sample(ours, x0, t, noise), theirs.add_noise(x0, noise, t))
    torch.testing.assert_close(velocity(ours, x0, noise, t), theirs.get_velocity(x0, noise, t))


def test_one_timestep_for_the_whole_batch_equals_one_per_image():
    schedule, x0, noise = NoiseSchedule.from_name('cosine'), randn(3, 3, 4, 4), randn(3, 3, 4, 4, seed=1)
    torch.testing.assert_close(q_sample(schedule, x0, 400, noise), q_sample(schedule, x0, torch.full((3,), 400), noise))


@pytest.mark.parametrize('prediction', PREDICTIONS)
def test_a_perfect_model_recovers_the_clean_image(prediction):
    schedule, x0, noise, t = NoiseSchedule.from_name('cosine'), randn(4, 3, 8, 8).clamp(-1, 1), randn(4, 3, 8, 8, seed=1), torch.tensor([0, 10, 300, 700])
    x_t = q_sample(schedule, x0, t, noise)
    torch.testing.assert_close(predict_x0(schedule, x_t, t, training_target(schedule, x0, noise, t, prediction), prediction), x0, atol=1e-4, rtol=0)


def test_posterior_with_the_true_image_is_consistent_with_the_forward_process():
    "Drawing x_{t-1} from q(x_{t-1} | x_t, x_0) must match the marginal q(x_{t-1} | x_0) in mean."
    schedule, x0 = NoiseSchedule.from_name('linear', 100), torch.full((20000, 1), 0.5)
    t = 60
    x_t = q_sample(schedule, x0, t, randn(20000, 1))
    mean, variance = q_posterior(schedule, x0, x_t, t)
    x_prev = mean + variance.sqrt() * randn(20000, 1, seed=1)
    expected_mean = schedule.alphas_cumprod[t - 1].sqrt() * 0.5
    expected_std = (1 - schedule.alphas_cumprod[t - 1]).sqrt()
    assert abs(x_prev.mean() - expected_mean) < 0.02 and abs(x_prev.std() - expected_std) < 0.02


@pytest.mark.parametrize('prediction', PREDICTIONS)
@pytest.mark.parametrize('name', ['linear', 'cosine'])
@pytest.mark.parametrize('steps', [None, 7])
@pytest.mark.parametrize('clip', [True, False])
def test_reverse_step_equals_diffusers(prediction, name, steps, clip):
    ours = NoiseSchedule.from_name(name)
    theirs = DDPMScheduler(1000, beta_schedule=DIFFUSERS_SCHEDULES[name], prediction_type=prediction, clip_sample=clip)
    if steps: theirs.set_timesteps(steps)
    timesteps = sampling_timesteps(1000, steps)
    for i in (0, 1, len(timesteps) - 1):
        t, prev_t = timesteps[i], timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x_t, output = randn(3, 3, 8, 8, seed=i), 2 * randn(3, 3, 8, 8, seed=100 + i)
        mine = p_step(ours, output, x_t, t, prev_t, prediction, torch.Generator().manual_seed(i), clip)
        reference = theirs.step(output, t, x_t, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(mine[0], reference.prev_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine[1], reference.pred_original_sample, atol=1e-5, rtol=1e-5)


def test_posterior_variance_equals_diffusers():
    ours, theirs = NoiseSchedule.from_name('quadratic'), DDPMScheduler(1000, beta_schedule='scaled_linear')
    x = randn(1, 1)
    for t in (1, 2, 500, 999):
        torch.testing.assert_close(q_posterior(ours, x, x, t)[1].reshape(()), theirs._get_variance(t))


def test_sampling_timesteps_are_diffusers_leading_spacing():
    for steps in (1, 3, 50, 333, 1000):
        reference = DDPMScheduler(1000); reference.set_timesteps(steps)
        assert sampling_timesteps(1000, steps) == reference.timesteps.tolist()
    for bad in (0, 1001, -3):
        with pytest.raises(DiffusionError, match='between 1 and 1000'): sampling_timesteps(1000, bad)


@pytest.mark.parametrize('prediction', PREDICTIONS)
def test_sampler_equals_a_diffusers_loop_with_a_diffusers_unet(prediction):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), down_block_types=('DownBlock2D', 'DownBlock2D'),
                       up_block_types=('UpBlock2D', 'UpBlock2D'), layers_per_block=1, norm_num_groups=4).eval()
    scheduler = DDPMScheduler(1000, beta_schedule='squaredcos_cap_v2', prediction_type=prediction); scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps: x = scheduler.step(unet(x, t).sample, t, x, generator=generator).prev_sample
    ours = sample(unet, NoiseSchedule.from_name('cosine'), (2, 3, 8, 8), 10, prediction, torch.Generator().manual_seed(3), progress=False)
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_sampler_is_reproducible_and_seed_dependent():
    torch.manual_seed(0); unet = TinyUNet(width=8, multipliers=(1, 2)).eval()
    schedule = NoiseSchedule.from_name('cosine', 100)
    draw = lambda seed: sample(unet, schedule, (2, 3, 8, 8), 5, generator=torch.Generator().manual_seed(seed), progress=False)
    torch.testing.assert_close(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_time_embedding_and_attention_equal_their_references():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0, 3, 999])
    torch.testing.assert_close(SinusoidalTimeEmbedding(64)(t), get_timestep_embedding(t, 64))
    with pytest.raises(DiffusionError, match='even'): SinusoidalTimeEmbedding(9)
    with pytest.raises(DiffusionError, match='heads'): SelfAttention(12, heads=5)


@pytest.mark.parametrize('multipliers, attention_levels', [((1, 2, 2), (2,)), ((1, 2), ()), ((1,), (0,))])
def test_unet_keeps_the_shape_and_uses_t(multipliers, attention_levels):
    torch.manual_seed(0); unet = TinyUNet(width=8, multipliers=multipliers, attention_levels=attention_levels)
    x = randn(3, 3, 16, 16)
    with torch.no_grad():
        assert unet(x, 5).shape == x.shape
        assert not torch.allclose(unet(x, 5), unet(x, 600))
        torch.testing.assert_close(unet(x, 5), unet(x, torch.tensor([5, 5, 5])))


@pytest.mark.parametrize('loss', list(LOSSES))
def test_loss_matches_a_hand_computation(loss):
    torch.manual_seed(0); unet = TinyUNet(width=8, multipliers=(1, 2))
    schedule, x0 = NoiseSchedule.from_name('linear', 100), randn(3, 3, 8, 8).clamp(-1, 1)
    value = diffusion_loss(unet, schedule, x0, loss, 'v_prediction', torch.Generator().manual_seed(4))
    generator = torch.Generator().manual_seed(4)
    t = torch.randint(0, 100, (3,), generator=generator); noise = torch.randn(x0.shape, generator=generator)
    error = unet(q_sample(schedule, x0, t, noise), t) - velocity(schedule, x0, noise, t)
    expected = {'l1': error.abs(), 'l2': error.square(), 'huber': torch.where(error.abs() < 0.1, 0.5 * error.square(), 0.1 * (error.abs() - 0.05))}[loss].mean()
    torch.testing.assert_close(value, expected)


def test_training_lowers_the_held_out_loss_and_is_reproducible():
    images = torch.linspace(-1, 1, 8).reshape(8, 1, 1, 1).expand(8, 3, 8, 8).contiguous()  # flat grey levels
    schedule = NoiseSchedule.from_name('cosine', 100)
    def run():
        torch.manual_seed(0); unet = TinyUNet(width=8, multipliers=(1, 2))
        return train_denoiser(unet, schedule, images, steps=30, batch_size=8, loss='l2', held_out=images, eval_every=10, progress=False)
    first, second = run(), run()
    assert first == second
    assert first['held_out_steps'] == [0, 10, 20, 30]
    assert first['held_out']['l2'][-1] < 0.7 * first['held_out']['l2'][0]
    with pytest.raises(DiffusionError, match='at least 1'): train_denoiser(TinyUNet(width=8), schedule, images, steps=0)


def test_held_out_losses_do_not_depend_on_batching():
    torch.manual_seed(0); unet = TinyUNet(width=8, multipliers=(1, 2)).eval()
    schedule, images = NoiseSchedule.from_name('cosine', 100), randn(10, 3, 8, 8).clamp(-1, 1)
    a, b = held_out_losses(unet, schedule, images), held_out_losses(unet, schedule, images, batch_size=3)
    assert a.keys() == set(LOSSES) and all(abs(a[k] - b[k]) < 1e-6 for k in a)


def test_frechet_distance_known_values():
    a, b = randn(4000, 2) * torch.tensor([1.0, 3.0]), randn(4000, 2, seed=1) + torch.tensor([2.0, 0.0])
    fit_a, fit_b = gaussian_fit(a), gaussian_fit(b)
    # independent coordinates: (Δμ)² + Σ (σa − σb)² = 4 + 0 + (3 − 1)²
    assert abs(frechet_distance(*fit_a, *fit_b) - 8.0) < 0.3
    assert abs(frechet_distance(*fit_a, *fit_a)) < 1e-8
    assert frechet_distance(*fit_a, *fit_b) == pytest.approx(frechet_distance(*fit_b, *fit_a), rel=1e-6)
    with pytest.raises(DiffusionError, match='N ≥ 2'): gaussian_fit(a[:1])


def test_frechet_distance_matches_scipy_and_the_diagonal_closed_form():
    from scipy.linalg import sqrtm
    rng = np.random.default_rng(1)
    left, right = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    a, b, mean_a, mean_b = left @ left.T, right @ right.T, rng.normal(size=6), rng.normal(size=6)
    expected = ((mean_a - mean_b) ** 2).sum() + np.trace(a + b - 2 * sqrtm(a @ b).real)
    assert frechet_distance(mean_a, a, mean_b, b) == pytest.approx(expected, rel=1e-9)
    variances_a, variances_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    closed = 2.0 ** 2 + ((np.sqrt(variances_a) - np.sqrt(variances_b)) ** 2).sum()
    assert frechet_distance([0, 0, 0], np.diag(variances_a), [2, 0, 0], np.diag(variances_b)) == pytest.approx(closed, rel=1e-12)


def test_frd_orders_noise_behind_real_images():
    def blobs(n, seed):
        generator = torch.Generator().manual_seed(seed)
        x = torch.ones(n, 3, 16, 16)
        for i in range(n):
            r, c = torch.randint(2, 10, (2,), generator=generator)
            x[i, :, r:r + 5, c:c + 4] = torch.rand(3, 1, 1, generator=generator) * 2 - 1
        return x
    real, other_real, noise = blobs(200, 0), blobs(200, 1), torch.randn(200, 3, 16, 16).clamp(-1, 1)
    assert frechet_random_feature_distance(real, other_real) < 0.2 * frechet_random_feature_distance(noise, real)


def test_study_trains_every_loss_from_the_same_start():
    images = torch.linspace(-1, 1, 8).reshape(8, 1, 1, 1).expand(8, 3, 8, 8).contiguous()
    results = loss_study(images, images, steps=2, batch_size=4, samples=4, sampling_steps=2, eval_every=1,
                         model_config=dict(width=8, multipliers=(1, 2)), progress=False)
    assert list(results['losses']) == list(LOSSES)
    starts = {loss: r['history']['held_out']['l2'][0] for loss, r in results['losses'].items()}
    assert len(set(starts.values())) == 1  # same initial weights and the same held-out draw
    ends = {loss: r['history']['held_out']['l2'][-1] for loss, r in results['losses'].items()}
    assert len(set(ends.values())) == 3  # but the losses trained differently
    table = study_table(results)
    assert table.count('\n') == 6 and '| L1 |' in table and 'FRD-64' in table
    with pytest.raises(DiffusionError, match="unknown loss 'l0'"): loss_study(images, images, losses=('l0',))

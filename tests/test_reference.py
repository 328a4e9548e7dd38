"Reference attention: exact off switch, cache equals recomputation, batching, strength, trainable reference nets."
import pytest, torch
from diffusers.models.attention_processor import AttnProcessor2_0

from anime_pose.controlnet import ModelError, tiny_unet
from anime_pose.reference import (ReferenceAttention, ReferenceAttnProcessor, add_reference_lora, make_reference_net,
                                  reference_bias, reference_trainable_parameters, self_attention_names)


@pytest.fixture(scope='module')
def unet(): return tiny_unet(seed=0).eval()


@pytest.fixture(scope='module')
def data():
    generator = torch.Generator().manual_seed(7)
    return dict(latents=torch.randn(2, 4, 8, 8, generator=generator), reference=torch.randn(1, 4, 8, 8, generator=generator),
                other=torch.randn(1, 4, 8, 8, generator=generator), text=torch.randn(2, 77, 32, generator=generator))


def predict(unet, data, t=500, latents=None, text=None):
    latents = data['latents'] if latents is None else latents
    return unet(latents, t, encoder_hidden_states=data['text'][:latents.shape[0]] if text is None else text).sample


@torch.no_grad()
def test_strength_zero_is_exactly_the_plain_unet_and_reference_matters(unet, data):
    plain = predict(unet, data)
    with ReferenceAttention(unet, strength=0) as reference:
        reference.write(data['reference'], data['text'][:1])
        with reference.read(): ignored = predict(unet, data)
        reference.strength = 1
        with reference.read(): guided = predict(unet, data)
        reference.write(data['other'], data['text'][:1])
        with reference.read(): other = predict(unet, data)
    assert torch.equal(ignored, plain)
    assert (guided - plain).abs().max() > 1e-4 and (guided - other).abs().max() > 1e-4


@torch.no_grad()
def test_cached_reference_equals_recomputed(unet, data):
    with ReferenceAttention(unet) as reference:
        reference.write(data['reference'], data['text'][:1])
        cached = [None] * 3
        for i, t in enumerate((900, 500, 100)):
            with reference.read(): cached[i] = predict(unet, data, t)
        batch = data['latents'].shape[0]  # projected once per layer for this batch size, reused
        assert set(reference.state.projections) == {(name, batch) for name in self_attention_names(unet)}
        for i, t in enumerate((900, 500, 100)):
            reference.write(data['reference'], data['text'][:1])  # what a second reference pass per step would give
            with reference.read(): torch.testing.assert_close(cached[i], predict(unet, data, t), rtol=0, atol=1e-6)


@torch.no_grad()
def test_one_reference_serves_every_sample_of_a_batch(unet, data):
    latents = torch.cat([data['latents'], data['latents'].flip(-1)])
    with ReferenceAttention(unet) as reference:
        reference.write(data['reference'], data['text'][:1])
        with reference.read():
            together = predict(unet, data, latents=latents, text=data['text'][:1].expand(4, -1, -1))
            alone = [predict(unet, data, latents=latents[i:i + 1], text=data['text'][:1]) for i in range(4)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=0, atol=1e-5)


@torch.no_grad()
def test_reference_batch_must_divide_the_batch(unet, data):
    with ReferenceAttention(unet) as reference:
        reference.write(torch.cat([data['reference'], data['other']]), data['text'])
        with reference.read(), pytest.raises(ValueError, match='reference batch 2 does not divide batch 3'):
            predict(unet, data, latents=torch.cat([data['latents'], data['latents'][:1]]), text=data['text'][:1].expand(3, -1, -1))


@torch.no_grad()
def test_strength_two_equals_the_reference_tokens_twice(unet, data):
    "log(s) on the logits multiplies each reference token's softmax weight by s, like repeating the token s times."
    with ReferenceAttention(unet, strength=2) as reference:
        reference.write(data['reference'], data['text'][:1])
        with reference.read(): doubled = predict(unet, data)
        reference.strength = 1
        reference.state.projections.clear()
        for name in list(reference.state.features):
            reference.state.features[name] = torch.cat([reference.state.features[name]] * 2, dim=1)
        with reference.read(): repeated = predict(unet, data)
    torch.testing.assert_close(doubled, repeated, rtol=0, atol=1e-5)


def test_reference_bias():
    assert reference_bias(4, 4, 1.0, torch.zeros(1)) is None
    bias = reference_bias(2, 3, 0.25, torch.zeros(1, dtype=torch.float64))
    assert bias.shape == (1, 1, 1, 5) and bias.dtype == torch.float64
    assert bias[..., :2].eq(0).all() and torch.allclose(bias[..., 2:], torch.log(torch.tensor(0.25, dtype=torch.float64)))


@torch.no_grad()
def test_write_pass_stops_after_the_last_self_attention(unet, data):
    calls = []
    hook = unet.conv_out.register_forward_hook(lambda *_: calls.append(1))
    try:
        with ReferenceAttention(unet) as reference:
            reference.write(data['reference'], data['text'][:1])
            assert len(reference.state.features) == len(self_attention_names(unet)) and not calls
            with reference.read(): predict(unet, data)
            assert calls
    finally: hook.remove()


def test_detach_restores_processors_and_forgets(unet, data):
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    reference = ReferenceAttention(unet).attach()
    assert all(isinstance(unet.attn_processors[name], ReferenceAttnProcessor) for name in self_attention_names(unet))
    assert not any(isinstance(p, ReferenceAttnProcessor) for name, p in unet.attn_processors.items() if 'attn2' in name)
    with torch.no_grad(): reference.write(data['reference'], data['text'][:1])
    reference.detach()
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before and not reference.state.features


def test_bad_uses(unet):
    with pytest.raises(ValueError, match='no reference written'), ReferenceAttention(unet) as reference, reference.read(): pass
    with pytest.raises(ValueError, match='must be >= 0'): ReferenceAttention(unet).strength = -0.5
    other = tiny_unet(block_out_channels=(32, 32), down_block_types=('CrossAttnDownBlock2D',) * 2, up_block_types=('CrossAttnUpBlock2D',) * 2)
    with pytest.raises(ModelError, match='does not match the UNet'): ReferenceAttention(unet, other)


def test_reference_net_starts_as_the_unet_and_learns(unet, data):
    reference_net = make_reference_net(unet)
    assert reference_net is not unet and len(reference_trainable_parameters(reference_net)) == len(list(unet.parameters()))
    with torch.no_grad(), ReferenceAttention(unet) as reference:
        reference.write(data['reference'], data['text'][:1])
        with reference.read(): training_free = predict(unet, data)
    with ReferenceAttention(unet, reference_net.eval()) as reference:
        reference.write(data['reference'], data['text'][:1])
        assert not reference.state.projections  # gradients on: nothing cached away from the graph
        with reference.read(): prediction = predict(unet, data)
        prediction.pow(2).mean().backward()
        assert not reference.state.projections
    torch.testing.assert_close(prediction.detach(), training_free, rtol=0, atol=1e-5)
    attn1 = reference_net.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert attn1.to_v.weight.grad is not None and attn1.to_v.weight.grad.abs().sum() > 0
    unet.zero_grad(set_to_none=True)


def test_lora_on_the_reference_net(unet, data):
    reference_net = make_reference_net(unet)
    adapters = add_reference_lora(reference_net, rank=2)
    assert adapters == reference_trainable_parameters(reference_net)
    assert 0 < sum(p.numel() for p in adapters) < sum(p.numel() for p in unet.parameters()) // 10
    with torch.no_grad():
        with ReferenceAttention(unet) as reference:
            reference.write(data['reference'], data['text'][:1])
            with reference.read(): training_free = predict(unet, data)
        with ReferenceAttention(unet, reference_net.eval()) as reference:
            reference.write(data['reference'], data['text'][:1])
            with reference.read(): adapted = predict(unet, data)
    torch.testing.assert_close(adapted, training_free, rtol=0, atol=1e-5)  # LoRA starts as the identity

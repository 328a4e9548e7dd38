"Anime users' prompt conventions on the tiny model: A1111 weights, long prompts, clip skip, negative prompts, diffusers' callbacks and control window."
import pytest, torch
from diffusers.callbacks import SDCFGCutoffCallback
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from anime_pose.controlnet import zero_convolutions
from anime_pose.pipeline import PoseTransferPipeline, TransferError
from anime_pose.pose import pose_from_joints
from anime_pose.prompts import (BREAK, PromptError, encode_tokens, encode_weighted_prompt, escape_prompt, parse_prompt_attention,
                                tokenize_prompt)
from anime_pose.tiny import encode_prompt, tiny_components, tiny_text_encoder, tiny_tokenizer

STANDING = {'nose': (32, 10), 'neck': (32, 18), 'right_shoulder': (26, 18), 'right_elbow': (22, 28), 'right_wrist': (20, 38),
            'left_shoulder': (38, 18), 'left_elbow': (42, 28), 'left_wrist': (44, 38), 'right_hip': (28, 36), 'right_knee': (28, 46),
            'right_ankle': (28, 58), 'left_hip': (36, 36), 'left_knee': (36, 46), 'left_ankle': (36, 58)}
TAGS = 'solo, ' + ', '.join(['long hair', 'blue eyes', 'open mouth', 'smile'] * 10)  # 111 tokens: two chunks


@pytest.fixture(scope='module')
def tokenizer(): return tiny_tokenizer()


@pytest.fixture(scope='module')
def text_encoder(tokenizer): return tiny_text_encoder(tokenizer)


@pytest.fixture(scope='module')
def pipe():
    "A tiny pipeline whose ControlNet's zero convolutions are open, so that the ControlNet changes the image."
    components = tiny_components(seed=0)
    with torch.no_grad():
        for conv in zero_convolutions(components['controlnet']):
            torch.nn.init.normal_(conv.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    pipe = PoseTransferPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe, prompt='1girl, solo, blue hair', **settings):
    reference = Image.new('RGB', (48, 64), (250, 240, 230)); reference.paste((40, 60, 200), (16, 8, 32, 56))
    return pipe(reference, pose_from_joints(STANDING, 64, 64), prompt=prompt, num_inference_steps=3, output_type='latent',
                generator=torch.Generator().manual_seed(0), **settings).images


def test_weights_parse_as_in_a1111():
    assert parse_prompt_attention('a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).') == [
        ('a ', 1.0), ('house', pytest.approx(1.573)), (' ', 1.1), ('on', pytest.approx(1.0)), (' a ', 1.1), ('hill', 0.55),
        (', sun, ', 1.1), ('sky', pytest.approx(1.4641)), ('.', 1.1)]  # A1111's own docstring example
    assert parse_prompt_attention('an (important) word') == [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    assert parse_prompt_attention('(unbalanced') == [('unbalanced', 1.1)]
    assert parse_prompt_attention('\\(literal\\]') == [('(literal]', 1.0)]
    assert parse_prompt_attention('1girl BREAK smile') == [('1girl', 1.0), BREAK, ('smile', 1.0)]


def test_weighted_tag_changes_embeddings_and_weight_one_is_the_plain_tag(tokenizer, text_encoder):
    plain = encode_weighted_prompt(tokenizer, text_encoder, '1girl, smile')
    assert torch.equal(encode_weighted_prompt(tokenizer, text_encoder, '1girl, (smile:1.0)'), plain)
    heavy = encode_weighted_prompt(tokenizer, text_encoder, '1girl, (smile:1.5)')
    assert not torch.allclose(heavy, plain)
    assert torch.allclose(heavy.mean(), plain.mean(), atol=1e-6)  # A1111 restores the mean
    assert not torch.allclose(encode_weighted_prompt(tokenizer, text_encoder, '1girl, [smile]'), plain)


def test_plain_short_prompts_encode_as_before(tokenizer, text_encoder):
    for prompt in ('', '1girl, solo, long hair', 'lowres, bad anatomy, worst quality'):
        assert torch.equal(encode_weighted_prompt(tokenizer, text_encoder, prompt), encode_prompt(tokenizer, text_encoder, prompt))


def test_escaped_tags_encode_as_training_encodes_them(tokenizer, text_encoder):
    tags = 'ganyu (genshin impact), [sketch], 1girl'  # Danbooru's series qualifiers are in brackets
    assert parse_prompt_attention(escape_prompt(tags)) == [(tags, 1.0)]
    assert torch.equal(encode_weighted_prompt(tokenizer, text_encoder, escape_prompt(tags)), encode_prompt(tokenizer, text_encoder, tags))
    assert not torch.equal(encode_weighted_prompt(tokenizer, text_encoder, tags), encode_prompt(tokenizer, text_encoder, tags))


def test_long_prompt_is_two_chunks_cut_at_a_comma(tokenizer, text_encoder):
    ids, weights = tokenize_prompt(tokenizer, TAGS)
    assert ids.shape == weights.shape == (2, 77)
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert tokenizer.convert_ids_to_tokens(ids[1, 1:3].tolist()) == ['open</w>', 'mouth</w>']  # the tag moved whole
    long = encode_weighted_prompt(tokenizer, text_encoder, TAGS)
    assert long.shape == (1, 154, 32)
    assert torch.equal(long[:, 77:], encode_tokens(text_encoder, ids[1:]))  # each chunk encoded on its own


def test_long_prompt_tail_tags_change_the_image(pipe):
    assert not torch.equal(draw(pipe, TAGS + ', hat'), draw(pipe, TAGS))


def test_clip_skip_is_the_penultimate_layer_after_the_final_norm(tokenizer, text_encoder):
    ids = tokenize_prompt(tokenizer, '1girl, long hair')[0]
    skipped = encode_tokens(text_encoder, ids, clip_skip=1)
    assert not torch.allclose(skipped, encode_tokens(text_encoder, ids))
    first_layer_only = CLIPTextModel(CLIPTextConfig(**{**text_encoder.config.to_dict(), 'num_hidden_layers': 1})).eval()
    first_layer_only.load_state_dict(text_encoder.state_dict(), strict=False)  # the same weights, cut after layer 1
    with torch.no_grad(): assert torch.allclose(skipped, first_layer_only(ids)[0], atol=1e-6)
    assert torch.equal(encode_tokens(text_encoder, ids, clip_skip=0), encode_tokens(text_encoder, ids))
    with pytest.raises(PromptError, match="from 0 to 1 .*'clip skip 2' is clip_skip=1"):
        encode_weighted_prompt(tokenizer, text_encoder, '1girl', clip_skip=2)


def test_clip_skip_changes_the_image(pipe):
    assert not torch.equal(draw(pipe, clip_skip=1), draw(pipe))


def test_callback_runs_each_step_and_can_replace_latents(pipe):
    calls = []
    def record(pipeline, step, timestep, tensors):
        calls.append((pipeline, step, int(timestep), sorted(tensors)))
        return {}
    assert torch.equal(draw(pipe, callback_on_step_end=record), draw(pipe))
    assert [c[1] for c in calls] == [0, 1, 2] and all(c[0] is pipe and c[3] == ['latents'] for c in calls)
    assert [c[2] for c in calls] == [int(t) for t in pipe.scheduler.timesteps]
    zeroed = draw(pipe, callback_on_step_end=lambda pipeline, step, t, tensors: {'latents': tensors['latents'] * 0})
    assert torch.equal(zeroed, torch.zeros_like(zeroed))  # the last step's replacement is the output
    with pytest.raises(TransferError, match=r"must name some of \['latents'\]"):
        draw(pipe, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    with pytest.raises(TransferError, match='must return a dict'):
        draw(pipe, callback_on_step_end=lambda *args: None)


def test_control_guidance_window(pipe):
    assert not torch.equal(draw(pipe), draw(pipe, controlnet_conditioning_scale=0.0))  # this ControlNet steers
    assert torch.equal(draw(pipe, control_guidance_end=0.0), draw(pipe, controlnet_conditioning_scale=0.0))
    assert torch.equal(draw(pipe, control_guidance_start=0.0, control_guidance_end=1.0), draw(pipe))
    assert not torch.equal(draw(pipe, control_guidance_end=0.5), draw(pipe))
    with pytest.raises(TransferError, match=r'control_guidance_start \(0.6\) must not be after control_guidance_end \(0.5\)'):
        draw(pipe, control_guidance_start=0.6, control_guidance_end=0.5)


def test_negative_prompt_changes_the_image_only_when_guided(pipe):
    assert not torch.equal(draw(pipe, negative_prompt='lowres', guidance_scale=5.0), draw(pipe, guidance_scale=5.0))
    assert torch.equal(draw(pipe, negative_prompt='lowres', guidance_scale=1.0), draw(pipe, guidance_scale=1.0))
    long_negative = draw(pipe, negative_prompt=TAGS, guidance_scale=5.0)  # two chunks against one: padded
    assert long_negative.shape == draw(pipe, guidance_scale=5.0).shape


def test_prompt_embeds_stand_in_for_prompts(pipe):
    positive = encode_weighted_prompt(pipe.tokenizer, pipe.text_encoder, TAGS)
    negative = encode_weighted_prompt(pipe.tokenizer, pipe.text_encoder, 'lowres')
    assert torch.equal(draw(pipe, prompt='', prompt_embeds=positive, negative_prompt_embeds=negative),
                       draw(pipe, TAGS, negative_prompt='lowres'))
    with pytest.raises(TransferError, match='give prompt or prompt_embeds, not both'):
        draw(pipe, prompt_embeds=positive)
    with pytest.raises(TransferError, match=r'prompt_embeds must be a tensor of shape \(1, tokens, 32\)'):
        draw(pipe, prompt='', prompt_embeds=positive[0])


def test_cli_prompt_flags(tmp_path, capsys):
    from anime_pose.cli import main
    Image.new('RGB', (64, 64), (250, 240, 230)).save(tmp_path / 'a.png'); pose_from_joints(STANDING, 64, 64).save(tmp_path / 'b.json')
    common = ['transfer', '--reference', str(tmp_path / 'a.png'), '--pose', str(tmp_path / 'b.json'), '--steps', '2']
    assert main([*common, '--out', str(tmp_path / 'ok.png'), '--clip-skip', '1', '--control-start', '0.2', '--control-end', '0.8',
                 '--prompt', TAGS + ', (smile:1.3)', '--negative-prompt', 'lowres']) == 0
    for extra, message in [(['--control-end', '1.5'], 'control_guidance_end must be a number from 0 to 1'),
                           (['--control-start', '0.6', '--control-end', '0.5'], 'must not be after'),
                           (['--clip-skip', '-1'], '--clip-skip must be >= 0, got -1'),
                           (['--clip-skip', '40'], 'clip_skip must be a whole number from 0 to')]:
        assert main([*common, '--out', str(tmp_path / 'bad.png'), *extra]) == 1
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and 'anime-pose transfer: error: ' in err and message in err, err
    assert not (tmp_path / 'bad.png').exists()

"""Artists' own files, offline: single-file SD1.x/SD2.x checkpoints and ControlNets (tiny stand-ins in the A1111 layout),
the training-free reference-only path on them, diffusers' custom-pipeline route to a saved model."""
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from anime_pose.cli import main
from anime_pose.controlnet import ModelError, controlnet_from_unet, tiny_unet
from anime_pose.export import LDM_PREFIX, controlnet_to_ldm, export_controlnet
from anime_pose.pipeline import PoseTransferPipeline, load_pipeline
from anime_pose.pose import pose_from_joints
from anime_pose.single_file import (checkpoint_family, clip_tokenizer, load_single_file_components,
                                    load_single_file_controlnet, read_checkpoint, save_single_file)
from anime_pose.tiny import sd_scheduler, tiny_tokenizer

STANDING = pose_from_joints({'nose': (32, 10), 'neck': (32, 18), 'right_shoulder': (26, 18), 'left_shoulder': (38, 18),
                             'right_hip': (28, 40), 'left_hip': (36, 40), 'right_knee': (28, 52), 'left_knee': (36, 52)},
                            64, 64)


def sd_shaped_components(text_width=32, seed=0):
    """Tiny components with Stable Diffusion's block structure (4 UNet levels of 2 layers, attention on the first 3;
    a 4-stage VAE), a two-layer text encoder and an original-layout ControlNet (hint widths 16, 32, 96, 256)."""
    torch.manual_seed(seed)
    unet = tiny_unet(seed, block_out_channels=(32, 32, 64, 64), layers_per_block=2, attention_head_dim=4,
                     down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
                     up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3, cross_attention_dim=text_width).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=('DownEncoderBlock2D',) * 4,
                        up_block_types=('UpDecoderBlock2D',) * 4, layers_per_block=2, norm_num_groups=8,
                        sample_size=64).eval()
    tokenizer = tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=37,
                                                num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id)).eval()
    controlnet = controlnet_from_unet(unet, conditioning_channels=(16, 32, 96, 256)).eval()
    for parameter in controlnet.controlnet_down_blocks.parameters(): torch.nn.init.normal_(parameter, std=0.1)  # it steers
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet,
                scheduler=sd_scheduler())


def weights(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith('position_ids')}


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope='module', params=['sd15', 'sd21'])
def artist_files(request, tmp_path_factory):
    """A tiny model as a diffusers folder (the original) and as an artist has it: one checkpoint in the SD1.x (CLIP) or
    SD2.x (OpenCLIP) layout plus a ControlNet in lllyasviel's layout with no config inside."""
    folder = tmp_path_factory.mktemp(request.param)
    parts = sd_shaped_components()
    PoseTransferPipeline(**parts).save_pretrained(folder / 'original')
    checkpoint = save_single_file(parts, folder / f'anything-tiny-{request.param}.safetensors',
                                  open_clip=request.param == 'sd21')
    controlnet = folder / 'control_tiny_openpose.safetensors'
    save_file(controlnet_to_ldm(parts['controlnet'].state_dict(), dict(parts['controlnet'].config)), controlnet)
    return request.param, parts, folder, checkpoint, controlnet


def test_single_file_checkpoints_load_back_weight_for_weight(artist_files):
    "UNet, VAE and text encoder from the A1111-layout file equal the diffusers-folder original exactly."
    family, parts, folder, checkpoint, _ = artist_files
    assert checkpoint_family(read_checkpoint(checkpoint)) == family
    loaded = load_single_file_components(checkpoint, config=folder / 'original')
    for name in ('unet', 'vae', 'text_encoder'): assert_same_weights(loaded[name], parts[name])
    assert loaded['scheduler'].config.prediction_type == 'epsilon'


def test_a_stock_layout_controlnet_without_config_takes_its_shape_from_the_unet(artist_files):
    _, parts, _, _, controlnet = artist_files
    assert_same_weights(load_single_file_controlnet(controlnet, dict(parts['unet'].config)), parts['controlnet'])


def latents(pipe, **settings):
    pipe.set_progress_bar_config(disable=True)
    reference = Image.new('RGB', (64, 64), (250, 240, 230))
    return pipe(reference, STANDING, prompt='1girl, solo, blue hair', num_inference_steps=3, output_type='latent',
                generator=torch.Generator().manual_seed(0), **settings).images


def test_single_files_draw_what_the_folder_draws(artist_files):
    "Latents from checkpoint + ControlNet files equal (to float rounding) those of the diffusers folder they came from."
    _, _, folder, checkpoint, controlnet = artist_files
    from_files = load_pipeline(checkpoint, controlnet, 'cpu', model_config=folder / 'original')
    from_folder = load_pipeline(folder / 'original', device='cpu')
    assert from_files.reference_net is None  # reference-only: the UNet's own weights encode the reference
    torch.testing.assert_close(latents(from_files), latents(from_folder), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(latents(from_files, reference_strength=0), latents(from_folder, reference_strength=0),
                               rtol=1e-4, atol=1e-4)


def test_the_training_free_command_on_single_file_stand_ins(artist_files, tmp_path, capsys):
    "The README's artist command: checkpoint file + stock-layout ControlNet file + reference-only; same image as the folder."
    _, _, folder, checkpoint, controlnet = artist_files
    Image.new('RGB', (64, 64), (250, 240, 230)).save(tmp_path / 'a.png')
    (tmp_path / 'b.json').write_text(json.dumps(STANDING.to_openpose()))
    common = ['--reference', str(tmp_path / 'a.png'), '--pose', str(tmp_path / 'b.json'), '--prompt', '1girl, solo',
              '--steps', '3', '--seed', '1', '--device', 'cpu', '--reference-only']
    assert main(['transfer', '--model', str(checkpoint), '--controlnet', str(controlnet),
                 '--model-config', str(folder / 'original'), '--out', str(tmp_path / 'files.png'), *common]) == 0
    assert main(['transfer', '--model', str(folder / 'original'), '--out', str(tmp_path / 'folder.png'), *common]) == 0
    files, folder_image = (np.asarray(Image.open(tmp_path / n), dtype=int) for n in ('files.png', 'folder.png'))
    assert np.abs(files - folder_image).max() <= 1


def test_v_prediction_from_the_yaml_beside_the_file_or_the_flag(artist_files, tmp_path):
    _, _, folder, checkpoint, _ = artist_files
    assert load_single_file_components(checkpoint, 'v_prediction', config=folder / 'original')['scheduler'].config.prediction_type == 'v_prediction'
    beside = tmp_path / 'wd-v.safetensors'
    beside.write_bytes(checkpoint.read_bytes())
    (tmp_path / 'wd-v.yaml').write_text('model:\n  params:\n    parameterization: "v"\n')
    assert load_single_file_components(beside, config=folder / 'original')['scheduler'].config.prediction_type == 'v_prediction'


def test_the_projects_own_export_loads_back_as_controlnet_file(tmp_path):
    "`anime-pose export` output (an SD-layout tiny ControlNet, config in its metadata) is accepted by --controlnet FILE."
    parts = sd_shaped_components()
    out = export_controlnet(parts['controlnet'], tmp_path / 'control_tiny_openpose.safetensors', allow_custom=True)
    assert_same_weights(load_single_file_controlnet(out), parts['controlnet'])  # no UNet needed: the metadata says
    PoseTransferPipeline(**{**parts, 'controlnet': controlnet_from_unet(parts['unet'])}).save_pretrained(tmp_path / 'base')
    pipe = PoseTransferPipeline.from_pretrained(tmp_path / 'base', controlnet=out)
    assert_same_weights(pipe.controlnet, parts['controlnet'])


def test_real_sd_configs_and_tokenizer_are_shipped():
    "The tokenizer gives openai/clip-vit-large-patch14's ids offline; SD2's pads with '!' as stabilityai's does."
    assert clip_tokenizer()('a photo of a cat').input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_tokenizer('sd21').pad_token_id == 0


def one_line_error(capsys, argv):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_refusals_are_one_line(tmp_path, capsys, artist_files):
    _, _, _, checkpoint, controlnet = artist_files
    Image.new('RGB', (64, 64)).save(tmp_path / 'a.png')
    (tmp_path / 'b.json').write_text(json.dumps(STANDING.to_openpose()))
    common = ['--reference', str(tmp_path / 'a.png'), '--pose', str(tmp_path / 'b.json'), '--device', 'cpu']
    sdxl = tmp_path / 'noobai.safetensors'
    save_file({'conditioner.embedders.1.model.ln_final.weight': torch.zeros(2),
               'model.diffusion_model.input_blocks.0.0.weight': torch.zeros(2, 4, 3, 3)}, sdxl)
    assert 'an SDXL checkpoint' in one_line_error(capsys, ['transfer', '--model', str(sdxl), '--controlnet', str(controlnet),
                                                           '--out', str(tmp_path / 'o.png'), *common])
    assert 'give the ControlNet too' in one_line_error(capsys, ['transfer', '--model', str(checkpoint),
                                                                '--out', str(tmp_path / 'o.png'), *common])
    (tmp_path / 'anything.ckpt').write_bytes(b'not a pickle we open')
    assert 'only .safetensors' in one_line_error(capsys, ['transfer', '--model', str(tmp_path / 'anything.ckpt'),
                                                          '--controlnet', str(controlnet), '--out', str(tmp_path / 'o.png'), *common])
    assert 'not a ControlNet' in one_line_error(capsys, ['transfer', '--model', str(checkpoint), '--controlnet', str(checkpoint),
                                                         '--model-config', str(checkpoint.parent / 'original'),
                                                         '--out', str(tmp_path / 'o.png'), *common])
    assert not (tmp_path / 'o.png').exists()


def test_diffusers_loads_a_saved_pipeline_through_its_custom_pipeline_route(tmp_path):
    "DiffusionPipeline.from_pretrained(dir, custom_pipeline='pipeline') builds PoseTransferPipeline; README.md says so."
    from diffusers import DiffusionPipeline
    parts = sd_shaped_components()
    PoseTransferPipeline(**parts).save_pretrained(tmp_path / 'model')
    pipe = DiffusionPipeline.from_pretrained(tmp_path / 'model', custom_pipeline='pipeline', trust_remote_code=True)
    assert type(pipe) is PoseTransferPipeline
    assert 'PoseTransferPipeline' in (tmp_path / 'model' / 'README.md').read_text()
    (tmp_path / 'mine').mkdir(); (tmp_path / 'mine' / 'README.md').write_text('my model card')
    PoseTransferPipeline(**parts).save_pretrained(tmp_path / 'mine')
    assert (tmp_path / 'mine' / 'README.md').read_text() == 'my model card'  # a user's file is kept


def test_training_takes_a_single_file_base(artist_files, tmp_path, monkeypatch):
    "load_base: an A1111-layout checkpoint gives its UNet, VAE and text encoder and a fresh ControlNet for its UNet."
    import anime_pose.single_file
    from anime_pose.finetune import load_base
    from anime_pose.train import TrainConfig
    _, parts, folder, checkpoint, _ = artist_files
    with pytest.raises(ModelError, match='diffusers cannot load it with the sd.. configs'):
        load_base(TrainConfig(base_model=str(checkpoint)), tmp_path)  # tiny shapes, the real SD configs
    monkeypatch.setattr(anime_pose.single_file, 'single_file_config_dir', lambda family: folder / 'original')
    base = load_base(TrainConfig(base_model=str(checkpoint)), tmp_path)
    for name in ('unet', 'vae', 'text_encoder'): assert_same_weights(base[name], parts[name])
    assert base['reference_net'] is None and base['controlnet'].config.cross_attention_dim == 32

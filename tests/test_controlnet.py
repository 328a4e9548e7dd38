"ControlNet anatomy: zero convolutions, the copied encoder, fitting checks, saving in the layout stock diffusers loads."
import pytest, torch
from PIL import Image

from anime_pose.controlnet import (ModelError, check_controlnet, condition_tensor, controlled_prediction, controlnet_from_unet,
                                   is_zero_initialised, load_controlnet, residual_maps, tiny_unet, zero_convolutions)
from anime_pose.core import ImageError


@pytest.fixture(scope='module')
def unet(): return tiny_unet(seed=0).eval()


def inputs(batch=2, size=8, width=32):
    generator = torch.Generator().manual_seed(3)
    return (torch.randn(batch, 4, size, size, generator=generator), torch.randn(batch, 77, width, generator=generator),
            torch.rand(batch, 3, size * 8, size * 8, generator=generator))


def opened(controlnet):
    "Give the zero convolutions small random weights, as the first training steps would."
    with torch.no_grad():
        for conv in zero_convolutions(controlnet): torch.nn.init.normal_(conv.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    return controlnet


def test_tiny_unet_is_seeded(unet):
    assert torch.equal(tiny_unet(seed=0).conv_in.weight, unet.conv_in.weight)
    assert not torch.equal(tiny_unet(seed=1).conv_in.weight, unet.conv_in.weight)


def test_controlnet_copies_the_encoder(unet):
    controlnet = controlnet_from_unet(unet)
    for name, parameter in controlnet.down_blocks.named_parameters():
        assert torch.equal(parameter, unet.down_blocks.get_parameter(name)), name
    assert torch.equal(controlnet.mid_block.resnets[0].conv1.weight, unet.mid_block.resnets[0].conv1.weight)


def test_fresh_controlnet_leaves_the_unet_output_unchanged(unet):
    controlnet = controlnet_from_unet(unet).eval()
    assert is_zero_initialised(controlnet)
    latents, text, condition = inputs()
    with torch.no_grad():
        plain = controlled_prediction(unet, None, latents, 321, text)
        controlled = controlled_prediction(unet, controlnet, latents, 321, text, condition, conditioning_scale=2.0)
    assert torch.equal(plain, controlled)


def test_opened_controlnet_steers_and_scale_zero_switches_it_off(unet):
    controlnet = opened(controlnet_from_unet(unet)).eval()
    assert not is_zero_initialised(controlnet)
    latents, text, condition = inputs()
    with torch.no_grad():
        plain = controlled_prediction(unet, None, latents, 321, text)
        steered = controlled_prediction(unet, controlnet, latents, 321, text, condition)
        other_pose = controlled_prediction(unet, controlnet, latents, 321, text, condition.flip(-1))
        off = controlled_prediction(unet, controlnet, latents, 321, text, condition, conditioning_scale=0)
    assert (steered - plain).abs().max() > 1e-4
    assert (steered - other_pose).abs().max() > 1e-4
    assert torch.equal(off, plain)


def test_residual_maps_one_picture_per_residual(unet):
    controlnet = opened(controlnet_from_unet(unet)).eval()
    latents, text, condition = inputs(batch=1)
    pictures = residual_maps(controlnet, latents, 0, text, condition)
    assert len(pictures) == len(controlnet.controlnet_down_blocks) + 1
    assert all(p.mode == 'L' and p.getextrema()[1] == 255 for p in pictures)


def test_condition_tensor_is_in_unit_range():
    white = Image.new('RGB', (32, 48), (255, 255, 255))
    tensor = condition_tensor([white, Image.new('RGB', (10, 10))], 64, 40)
    assert tensor.shape == (2, 3, 64, 40) and tensor[0].min() == 1 and tensor[1].max() == 0
    with pytest.raises(ImageError, match='no such file'): condition_tensor(['/nonexistent/skeleton.png'], 64, 64)


def test_check_controlnet_names_the_mismatch(unet):
    controlnet = controlnet_from_unet(unet)
    check_controlnet(unet, controlnet)
    with pytest.raises(ModelError, match='cross_attention_dim: UNet 1024 vs ControlNet 32'): check_controlnet(tiny_unet(cross_attention_dim=1024), controlnet)
    wide = tiny_unet(block_out_channels=(32, 96))
    with pytest.raises(ModelError, match='block_out_channels'): check_controlnet(wide, controlnet)


def test_load_controlnet_errors(tmp_path, unet):
    with pytest.raises(ModelError, match='no such directory'): load_controlnet(tmp_path / 'absent')
    controlnet = controlnet_from_unet(unet)
    controlnet.save_pretrained(tmp_path / 'pickled', safe_serialization=False)
    with pytest.raises(ModelError, match='missing diffusion_pytorch_model.safetensors'): load_controlnet(tmp_path / 'pickled')
    controlnet.save_pretrained(tmp_path / 'ok')
    with pytest.raises(ModelError, match='does not fit the UNet'): load_controlnet(tmp_path / 'ok', tiny_unet(cross_attention_dim=64))


def test_saved_controlnet_loads_in_stock_diffusers_pipeline(tmp_path, unet):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from anime_pose.tiny import tiny_components
    components = tiny_components(seed=0)
    trained = opened(components['controlnet'])
    trained.save_pretrained(tmp_path / 'controlnet')
    assert (tmp_path / 'controlnet' / 'diffusion_pytorch_model.safetensors').is_file()
    loaded = ControlNetModel.from_pretrained(tmp_path / 'controlnet')
    assert torch.equal(loaded.controlnet_mid_block.weight, trained.controlnet_mid_block.weight)
    assert torch.equal(load_controlnet(tmp_path / 'controlnet', components['unet']).controlnet_down_blocks[0].weight, trained.controlnet_down_blocks[0].weight)
    pipe = StableDiffusionControlNetPipeline(vae=components['vae'], text_encoder=components['text_encoder'], tokenizer=components['tokenizer'],
                                             unet=components['unet'], controlnet=loaded, scheduler=components['scheduler'],
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    skeleton = Image.new('RGB', (64, 64)); skeleton.paste((255, 0, 0), (28, 8, 36, 56))
    image = pipe('1girl, solo', image=skeleton, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)

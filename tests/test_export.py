"`anime-pose export`: diffusers ControlNets to the original (ldm/cldm) single-file layout of A1111 and ComfyUI."
import gc, json, subprocess, sys
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anime_pose.export import (ExportError, check_export_name, controlnet_to_ldm, default_export_name, export_controlnet,
                               export_difference, exported_config, ldm_key, load_controlnet_weights, load_exported,
                               single_file_loaders)
from anime_pose.cli import main

TINY = {  # tiny ControlNets that keep the original hint encoder; the last has two-digit input block indices
    'two_levels': dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                       cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8),
    'four_levels': dict(block_out_channels=(16, 16, 32, 32), layers_per_block=3, transformer_layers_per_block=2,
                        down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
                        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True),
}
SD15 = dict(cross_attention_dim=768)  # diffusers' defaults are SD1.5's ControlNet otherwise
SD21 = dict(cross_attention_dim=1024, use_linear_projection=True, attention_head_dim=(5, 10, 20, 20))


def cldm_keys(channels, layers_per_block, attention_levels, depth=1):
    "The weight names of lllyasviel's cldm.ControlNet, written from its constructor (independently of diffusers)."
    pairs = lambda prefix, names: {f'{prefix}.{n}.{p}' for n in names for p in ('weight', 'bias')}
    def resblock(prefix, skip): return pairs(prefix, ['in_layers.0', 'in_layers.2', 'emb_layers.1', 'out_layers.0', 'out_layers.3'] + ['skip_connection'] * skip)
    def transformer(prefix):
        keys = pairs(prefix, ['norm', 'proj_in', 'proj_out'])
        for d in range(depth):
            block = f'{prefix}.transformer_blocks.{d}'
            keys |= {f'{block}.attn{a}.to_{q}.weight' for a in (1, 2) for q in 'qkv'}
            keys |= pairs(block, ['attn1.to_out.0', 'attn2.to_out.0', 'norm1', 'norm2', 'norm3', 'ff.net.0.proj', 'ff.net.2'])
        return keys
    keys = pairs('time_embed', ['0', '2']) | pairs('input_blocks.0', ['0']) | pairs('zero_convs.0', ['0'])
    keys |= pairs('input_hint_block', [str(i) for i in range(0, 16, 2)])
    block, previous = 1, channels[0]
    for level, width in enumerate(channels):
        for _ in range(layers_per_block):
            keys |= resblock(f'input_blocks.{block}.0', previous != width) | pairs(f'zero_convs.{block}', ['0'])
            if level in attention_levels: keys |= transformer(f'input_blocks.{block}.1')
            block, previous = block + 1, width
        if level < len(channels) - 1:
            keys |= pairs(f'input_blocks.{block}.0', ['op']) | pairs(f'zero_convs.{block}', ['0'])
            block += 1
    keys |= resblock('middle_block.0', False) | transformer('middle_block.1') | resblock('middle_block.2', False) | pairs('middle_block_out', ['0'])
    return {'control_model.' + k for k in keys}


def expected_keys(model):
    config = model.config
    attention_levels = [i for i, t in enumerate(config.down_block_types) if t.startswith('CrossAttn')]
    depth = config.transformer_layers_per_block if isinstance(config.transformer_layers_per_block, int) else config.transformer_layers_per_block[0]
    return cldm_keys(config.block_out_channels, config.layers_per_block, attention_levels, depth)


def check_hint_encoder(shapes, model_channels):
    "The fixed hint encoder: hint (3) → 16 → 16 → 32 → 32 → 96 → 96 → 256 → model channels, 3×3 convolutions."
    widths = [3, 16, 16, 32, 32, 96, 96, 256, model_channels]
    for i in range(8):
        assert shapes[f'control_model.input_hint_block.{2 * i}.weight'] == (widths[i + 1], widths[i], 3, 3)


def assert_same_weights(loaded, source, stored_as=None):
    "Every weight of `loaded` equals `source`'s (rounded to `stored_as` first, when the file held another dtype)."
    loaded, source = loaded.state_dict(), source.state_dict()
    assert loaded.keys() == source.keys()
    for k in source:
        expected = source[k].to(stored_as).to(source[k].dtype) if stored_as else source[k]
        assert loaded[k].dtype == expected.dtype and torch.equal(loaded[k], expected), k


@pytest.fixture(params=list(TINY))
def tiny(request, tmp_path):
    torch.manual_seed(0)
    model = ControlNetModel(**TINY[request.param])
    model.save_pretrained(tmp_path / 'controlnet')
    return model, tmp_path / 'controlnet'


def test_ldm_keys_match_the_original_architecture(tiny):
    model, _ = tiny
    ldm = controlnet_to_ldm(model.state_dict(), model.config)
    assert set(ldm) == expected_keys(model)
    zero_convs = {k.split('.')[2] for k in ldm if k.startswith('control_model.zero_convs.')}
    assert len(zero_convs) == len(model.controlnet_down_blocks) == len(model.config.block_out_channels) * (model.config.layers_per_block + 1)
    check_hint_encoder({k: tuple(v.shape) for k, v in ldm.items()}, model.config.block_out_channels[0])


def test_round_trip_through_diffusers_single_file_loader(tiny, tmp_path):
    model, folder = tiny
    out = export_controlnet(folder, tmp_path / 'control_test_openpose.safetensors', allow_custom=True)
    with safe_open(str(out), 'pt') as f: assert all(k.startswith('control_model.') for k in f.keys())
    assert_same_weights(ControlNetModel.from_single_file(str(out), config=str(folder), local_files_only=True), model)
    assert_same_weights(load_exported(out), model)  # config from the file's own metadata
    assert exported_config(out)['block_out_channels'] == list(model.config.block_out_channels)


def test_fp16_round_trip_and_default_name(tiny, tmp_path):
    model, folder = tiny
    out = export_controlnet(folder, tmp_path, fp16=True, allow_custom=True)
    assert out == tmp_path / 'control_animepose_tiny_openpose_fp16.safetensors'
    assert {t.dtype for t in load_file(out).values()} == {torch.float16}
    assert_same_weights(load_exported(out), model, stored_as=torch.float16)
    assert export_difference(out, folder) == 0  # against the source rounded to float16
    model.conv_in.weight.data[0, 0, 0, 0] += 0.5  # a weight the file does not hold
    assert export_difference(out, model) >= 0.499


def test_full_size_sd15_and_sd21_export_and_round_trip(tmp_path):
    "One at a time (1.4 GB each): the original key set and shapes, then identical weights back through diffusers."
    for shape, base, context, proj_in in ((SD15, 'sd15', 768, (320, 320, 1, 1)), (SD21, 'sd21', 1024, (320, 320))):
        torch.manual_seed(0)
        model = ControlNetModel(**shape)
        model.save_config(tmp_path / base)
        out = export_controlnet(model, tmp_path)
        assert out.name == f'control_animepose_{base}_openpose.safetensors'
        with safe_open(str(out), 'pt') as f: shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert set(shapes) == expected_keys(model) and len(shapes) == 340, base
        check_hint_encoder(shapes, 320)
        assert shapes['control_model.input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight'] == (640, context)  # what A1111 reads context_dim from
        assert shapes['control_model.input_blocks.1.1.proj_in.weight'] == proj_in  # SD2's linear projections
        assert shapes['control_model.zero_convs.11.0.weight'] == (1280, 1280, 1, 1)
        loaded = ControlNetModel.from_single_file(str(out), config=str(tmp_path / base), local_files_only=True)
        assert_same_weights(loaded, model)
        del model, loaded; out.unlink(); gc.collect()


def test_the_pipelines_tiny_controlnet_exports_for_diffusers(tmp_path):
    "The project's own tiny ControlNet has a narrower hint encoder: it round-trips, and the loaders it fits are named."
    from anime_pose.pipeline import PoseTransferPipeline
    from anime_pose.tiny import tiny_components
    components = tiny_components()
    controlnet = components['controlnet']
    PoseTransferPipeline(**components).save_pretrained(tmp_path / 'model')  # a saved pipeline: found through controlnet/
    assert main(['export', '--controlnet', str(tmp_path / 'model'), '--out', str(tmp_path), '--allow-custom']) == 0
    out = tmp_path / 'control_animepose_tiny_openpose.safetensors'
    assert_same_weights(load_exported(out), controlnet)
    loaders = single_file_loaders(exported_config(out))
    assert loaders['diffusers'] == '' and 'hint encoder' in loaders['ComfyUI'] and 'SD1.x/SD2.x-shaped' in loaders['AUTOMATIC1111']


def test_loaders_of_full_size_and_64_channel_head_controlnets():
    with torch.device('meta'):
        for shape in (SD15, SD21): assert set(single_file_loaders(ControlNetModel(**shape).config).values()) == {''}
        wide = ControlNetModel(block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=(1, 2), norm_num_groups=8,
                               down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), cross_attention_dim=32).config
    assert single_file_loaders(wide)['ComfyUI'] == '' and single_file_loaders(wide)['AUTOMATIC1111'] != ''


def test_ldm_key_refuses_weights_without_a_place():
    with pytest.raises(ExportError, match='add_embedding.linear_1.weight: this weight has no place'): ldm_key('add_embedding.linear_1.weight', 2)
    with pytest.raises(ExportError, match='no place'): ldm_key('down_blocks.0.resnets.0.nonsense.weight', 2)


@pytest.mark.parametrize('change, message', [
    (dict(conditioning_embedding_out_channels=(16, 32)), 'the original hint encoder has 4 widths'),
    (dict(conditioning_channels=1), 'the pose hint has 1 channels'),
    (dict(controlnet_conditioning_channel_order='bgr'), 'BGR'),
    (dict(global_pool_conditions=True), 'shuffle'),
    (dict(class_embed_type='timestep'), "class_embed_type='timestep'"),
])
def test_unexportable_controlnets_are_refused_and_nothing_is_written(tmp_path, change, message):
    model = ControlNetModel(**{**TINY['two_levels'], **change})
    with pytest.raises(ExportError, match=message.replace('(', r'\(').replace(')', r'\)')):
        export_controlnet(model, tmp_path / 'control_x_openpose.safetensors')
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('name, message', [
    ('control_sd15_openpose.ckpt', 'must end in .safetensors'),
    ('control_sd15_openpose.SAFETENSORS', 'must end in .safetensors'),
    ('control_v11e_sd15_shuffle.safetensors', "'shuffle' in the name"),
    ('control_sd15_Shuffle_openpose.safetensors', "'shuffle' in the name"),
    ('ip-adapter_instant_id_sdxl.safetensors', "'instant_id' in the name"),
])
def test_names_the_uis_misread_are_refused(name, message):
    with pytest.raises(ExportError, match=message): check_export_name(name)


def test_default_names_are_lllyasviel_style():
    with torch.device('meta'):
        assert default_export_name(ControlNetModel(**SD15).config) == 'control_animepose_sd15_openpose.safetensors'
        assert default_export_name(ControlNetModel(**SD21).config, fp16=True) == 'control_animepose_sd21_openpose_fp16.safetensors'
        assert default_export_name(ControlNetModel(**{**SD15, 'block_out_channels': (32, 64, 64, 64), 'norm_num_groups': 8}).config) == 'control_animepose_tiny_openpose.safetensors'


def test_bad_source_folders(tmp_path, tiny):
    model, folder = tiny
    with pytest.raises(ExportError, match='no such ControlNet folder'): load_controlnet_weights(tmp_path / 'missing')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ExportError, match='no config.json'): load_controlnet_weights(tmp_path / 'empty')
    (tmp_path / 'broken').mkdir(); (tmp_path / 'broken' / 'config.json').write_text('{"block_out')
    with pytest.raises(ExportError, match='not valid JSON'): load_controlnet_weights(tmp_path / 'broken')
    pickled = tmp_path / 'pickled'; pickled.mkdir(); (pickled / 'config.json').write_text((folder / 'config.json').read_text())
    torch.save(model.state_dict(), pickled / 'diffusion_pytorch_model.bin')
    with pytest.raises(ExportError, match=r'pickle \(.bin\)'): load_controlnet_weights(pickled)
    (pickled / 'diffusion_pytorch_model.safetensors').write_bytes(b'\x00' * 100)
    with pytest.raises(ExportError, match='unreadable safetensors file'): load_controlnet_weights(pickled)
    save_file({k: v for k, v in model.state_dict().items() if not k.startswith('controlnet_down_blocks.0.')},
              pickled / 'diffusion_pytorch_model.safetensors')
    with pytest.raises(ExportError, match='missing, unexpected or misshapen.*controlnet_down_blocks.0.bias'): load_controlnet_weights(pickled)


def test_pipeline_folders_and_sharded_weights(tmp_path, tiny):
    model, folder = tiny
    model.save_pretrained(tmp_path / 'pipeline' / 'controlnet')
    (tmp_path / 'pipeline' / 'model_index.json').write_text('{}')
    assert load_controlnet_weights(tmp_path / 'pipeline')[0]['layers_per_block'] == model.config.layers_per_block
    model.save_pretrained(tmp_path / 'sharded', max_shard_size='20KB')
    assert (tmp_path / 'sharded' / 'diffusion_pytorch_model.safetensors.index.json').is_file()
    out = export_controlnet(tmp_path / 'sharded', tmp_path / 'control_sharded_openpose.safetensors', allow_custom=True)
    assert_same_weights(load_exported(out), model)


def test_a_file_without_our_metadata_needs_a_config(tmp_path):
    save_file({'x': torch.zeros(1)}, tmp_path / 'other.safetensors')
    with pytest.raises(ExportError, match="no ControlNet config in the file's metadata"): exported_config(tmp_path / 'other.safetensors')
    (tmp_path / 'junk.safetensors').write_bytes(b'junk')
    with pytest.raises(ExportError, match='unreadable safetensors file'): exported_config(tmp_path / 'junk.safetensors')


def test_cli_exports_verifies_and_reports(tmp_path, tiny, capsys):
    _, folder = tiny
    assert main(['export', '--format', 'a1111', '--controlnet', str(folder), '--out', str(tmp_path / 'new') + '/', '--fp16', '--verify', '--allow-custom']) == 0
    out = capsys.readouterr().out
    assert (tmp_path / 'new' / 'control_animepose_tiny_openpose_fp16.safetensors').is_file()
    assert 'wrote' in out and 'AUTOMATIC1111: does not load it faithfully' in out and 'diffusers: loads it' in out and 'verified' in out
    assert main(['export', '--controlnet', str(folder), '--out', str(tmp_path / 'tiny_pose.safetensors'), '--allow-custom']) == 0
    assert "without 'openpose' in the name" in capsys.readouterr().out


def test_cli_default_source_is_the_bundled_model(tmp_path, tiny, monkeypatch, capsys):
    model, folder = tiny
    monkeypatch.chdir(tmp_path)
    import importlib.resources, shutil
    from anime_pose.core import bundled_path
    shutil.copytree(bundled_path('single_file'), tmp_path / 'site' / 'anime_pose' / 'assets' / 'single_file')  # shipped configs
    monkeypatch.setattr(importlib.resources, 'files', lambda package: tmp_path / 'site' / package)
    assert main(['export']) == 1
    assert 'no bundled model in this installation' in capsys.readouterr().err
    model.save_pretrained(tmp_path / 'site' / 'anime_pose' / 'assets' / 'model' / 'controlnet')
    assert main(['export', '--allow-custom']) == 0
    assert_same_weights(load_exported(tmp_path / 'control_animepose_tiny_openpose.safetensors'), model)


def run_cli(*args):
    return subprocess.run([str(Path(sys.executable).parent / 'anime-pose'), 'export', *args], capture_output=True, text=True)


def test_console_script_user_errors_are_one_line_and_write_nothing(tmp_path):
    result = run_cli('--controlnet', str(tmp_path / 'missing'), '--out', str(tmp_path / 'control_x_openpose.safetensors'))
    assert result.returncode == 1 and result.stderr.strip().count('\n') == 0 and 'no such ControlNet folder' in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_misread_name_is_refused_before_reading_the_model(tmp_path, capsys):
    (tmp_path / 'cn').mkdir()  # not even a ControlNet: the name is checked first
    assert main(['export', '--controlnet', str(tmp_path / 'cn'), '--out', str(tmp_path / 'control_sd15_shuffle.safetensors')]) == 1
    assert "'shuffle' in the name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['cn']


def test_console_script_help_has_examples_and_places():
    result = run_cli('--help')
    assert result.returncode == 0
    for text in ('--controlnet DIR', '--fp16', 'examples:', 'models/ControlNet', 'models/controlnet', 'from_single_file'):
        assert text in result.stdout


def test_a_calibrated_scale_travels_with_the_export(tmp_path, tiny, capsys):
    _, folder = tiny
    (folder.parent / 'model_index.json').write_text(json.dumps({'_class_name': 'PoseTransferPipeline', 'controlnet_conditioning_scale': 2.5}))
    assert main(['export', '--controlnet', str(folder.parent), '--out', str(tmp_path / 'calibrated_openpose.safetensors'), '--allow-custom']) == 0
    assert 'calibrated ControlNet scale 2.5: use it as the control weight' in capsys.readouterr().out
    with safe_open(str(tmp_path / 'calibrated_openpose.safetensors'), 'pt') as f:
        assert f.metadata()['anime_pose.controlnet_conditioning_scale'] == '2.5'


def test_controlnets_the_uis_cannot_build_are_refused_unless_asked_for(tmp_path, tiny, capsys):
    "A tiny (not SD1.5/SD2.1-shaped) ControlNet: exit 1, one line, nothing written; --allow-custom writes a file diffusers loads."
    model, folder = tiny
    assert main(['export', '--controlnet', str(folder), '--out', str(tmp_path / 'out') + '/']) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'cannot load this ControlNet faithfully' in err and '--allow-custom' in err
    assert not (tmp_path / 'out').exists() or list((tmp_path / 'out').iterdir()) == []
    assert main(['export', '--controlnet', str(folder), '--out', str(tmp_path / 'custom_openpose.safetensors'), '--allow-custom']) == 0
    assert 'layout check: its own config (custom architecture' in capsys.readouterr().out
    assert_same_weights(load_exported(tmp_path / 'custom_openpose.safetensors'), model)


def test_sd_shaped_with_other_heads_is_not_a_ui_target():
    "Same weight shapes as SD1.5 but other attention heads: A1111 would run it wrongly, so it is not an sd15 target."
    from anime_pose.export import target_config, ui_target
    assert ui_target(target_config('sd15')) == 'sd15' and ui_target(target_config('sd21')) == 'sd21'
    assert ui_target({**target_config('sd15'), 'attention_head_dim': 5}) is None
    assert ui_target({**target_config('sd21'), 'use_linear_projection': False}) is None


def test_layout_check_names_missing_extra_and_misshapen_tensors():
    from anime_pose.export import check_ldm_layout, ldm_layout, target_config
    layout = ldm_layout(target_config('sd15'))
    check_ldm_layout(layout, 'sd15')
    broken = {**layout, 'control_model.zero_convs.0.0.weight': (320, 320, 3, 3), 'control_model.extra': (1,)}
    del broken['control_model.middle_block_out.0.bias']
    with pytest.raises(ExportError, match='3 tensors missing, extra or misshapen for the sd15 ControlNet layout'):
        check_ldm_layout(broken, 'sd15')

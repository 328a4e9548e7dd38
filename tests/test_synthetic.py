"""Synthetic characters: determinism, character-disjoint splits, masks that match the drawing, keypoints on the limbs,
plausible poses, the CLI."""
import json
from dataclasses import replace

import datasets
import numpy as np
import pytest
from PIL import Image

from anime_pose.cli import main
from anime_pose.core import AnimePoseError
from anime_pose.pose import Pose
from anime_pose.synthetic import (BACKGROUNDS, PART_LABELS, POSE_LIBRARY, SPLITS, Identity, PoseSpec, _articulate,
                                  _body_from_pose, _proportions, character_renderings, identity_tags, mirror_pose,
                                  random_identity, render_character, sample_pose, split_characters, synthetic_dataset)

GREEN = (0, 255, 0)  # a background no character colour comes near
LIMB_JOINTS = list(range(2, 14))  # shoulders, elbows, wrists, hips, knees, ankles
LIMBS = [(2, 3), (3, 4), (5, 6), (6, 7), (8, 9), (9, 10), (11, 12), (12, 13)]


def identities(count=12, seed=0):
    rng = np.random.default_rng(seed)
    return [random_identity(rng) for _ in range(count)]


def pixel(rendering, joint):
    x, y = rendering.keypoints[joint, :2] * rendering.image.size[0]
    return int(y), int(x)


# ---- determinism ----

def rows(dataset):
    return [(split, r['character'], r['reference'].tobytes(), r['target'].tobytes(), r['masks'].tobytes(),
             np.asarray(r['pose']).tobytes(), tuple(r['tags']), r['identity'], r['pose_name']) for split in SPLITS for r in dataset[split]]


def test_same_seed_same_dataset_whatever_the_processes():
    one = synthetic_dataset(characters=4, poses_per_character=2, seed=3, num_proc=1, progress=False)
    two = synthetic_dataset(characters=4, poses_per_character=2, seed=3, num_proc=2, progress=False)
    assert rows(one) == rows(two)


def test_different_seeds_different_characters():
    a = synthetic_dataset(characters=3, poses_per_character=2, seed=0, progress=False)
    b = synthetic_dataset(characters=3, poses_per_character=2, seed=1, progress=False)
    assert {r[2] for r in rows(a)}.isdisjoint({r[2] for r in rows(b)})
    assert {r[1] for r in rows(a)}.isdisjoint({r[1] for r in rows(b)})


def test_random_identity_and_pose_are_seeded():
    assert random_identity(np.random.default_rng(5)) == random_identity(np.random.default_rng(5))
    assert sample_pose(np.random.default_rng(5)) == sample_pose(np.random.default_rng(5))
    a, b = render_character(Identity(), 'waving', 64), render_character(Identity(), 'waving', 64)
    assert a.image.tobytes() == b.image.tobytes() and (a.masks == b.masks).all()


# ---- splits and triples ----

def test_splits_are_character_disjoint_and_complete():
    dataset = synthetic_dataset(characters=10, poses_per_character=3, seed=2, progress=False)
    characters = {split: set(dataset[split]['character']) for split in SPLITS}
    assert set(dataset) == set(SPLITS)
    for a in SPLITS:
        for b in SPLITS:
            if a != b: assert characters[a].isdisjoint(characters[b])
    assert sum(len(c) for c in characters.values()) == 10
    assert [dataset[s].num_rows for s in SPLITS] == [3 * len(characters[s]) for s in SPLITS]


@pytest.mark.parametrize('characters', [3, 7, 10, 101])
def test_split_characters_partitions(characters):
    splits = split_characters(characters, seed=9)
    assert sorted(sum(splits.values(), [])) == list(range(characters))
    assert all(len(splits[s]) >= 1 for s in SPLITS)
    assert splits == split_characters(characters, seed=9) and splits != split_characters(characters, seed=10) or characters == 3


def test_triples_pair_the_same_character_in_two_poses():
    dataset = synthetic_dataset(characters=3, poses_per_character=3, seed=4, progress=False)
    for row in dataset['train']:
        identity = Identity.from_json(row['identity'])
        assert row['tags'] == identity_tags(identity)
        assert row['pose_name'] != row['reference_pose_name']
        assert not np.allclose(row['pose'], row['reference_pose'])
        masks = np.asarray(row['masks'])
        assert masks.shape == (64, 64) and set(np.unique(masks)) <= set(PART_LABELS.values())


def test_target_and_pose_column_are_the_drawing():
    identity, specs, drawings = character_renderings(seed=6, index=0, poses=3, size=64)
    dataset = synthetic_dataset(characters=3, poses_per_character=3, seed=6, progress=False)
    row = next(r for s in SPLITS for r in dataset[s] if r['character'].endswith('000000'))
    assert row['target'].tobytes() == drawings[0].image.tobytes()
    assert row['reference'].tobytes() == drawings[1].image.tobytes()
    np.testing.assert_array_equal(np.asarray(row['pose'], np.float32), drawings[0].keypoints)
    np.testing.assert_array_equal(np.asarray(row['masks']), drawings[0].masks)


@pytest.mark.parametrize('kwargs, message', [
    (dict(characters=2), 'need at least 3 characters'),
    (dict(poses_per_character=1), 'poses_per_character must be at least 2'),
    (dict(size=8), 'size must be between'),
    (dict(num_proc=0), 'num_proc must be at least 1'),
])
def test_bad_dataset_arguments(kwargs, message):
    with pytest.raises(AnimePoseError, match=message):
        synthetic_dataset(**{'characters': 3, 'poses_per_character': 2, 'progress': False, **kwargs})


# ---- masks and keypoints against the drawn pixels ----

def dilate(mask):
    out = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1): out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def erode(mask): return ~dilate(~mask)


@pytest.mark.parametrize('size', [64, 128])
def test_masks_cover_exactly_the_drawn_pixels(size):
    names = [n for n in POSE_LIBRARY if not POSE_LIBRARY[n].seat]  # a seat is drawn but labelled background
    for i, identity in enumerate(identities(8)):
        rendering = render_character(identity, names[i % len(names)], size, background=GREEN)
        difference = np.abs(np.asarray(rendering.image, np.int16) - GREEN).max(-1)
        character = rendering.masks != PART_LABELS['background']
        assert character.mean() > 0.03
        assert not (difference > 40)[~dilate(character)].any(), 'a drawn pixel is labelled background'
        shows_background = ~(difference > 40)[erode(character)]  # only pinholes between parts, a pixel or two wide
        assert shows_background.mean() < 0.01, 'pixels labelled as the character show the background'


def test_seat_and_shadow_are_background():
    rendering = render_character(Identity(), 'sitting', 64, background=GREEN)
    difference = np.abs(np.asarray(rendering.image, np.int16) - GREEN).max(-1)
    seat_pixels = (difference > 40) & (rendering.masks == PART_LABELS['background'])
    assert seat_pixels.sum() > 20


def test_each_part_is_drawn_in_its_colour():
    identity = Identity(hair_colour='pink', top_colour='blue', pattern='plain', bottom='pants', bottom_colour='yellow',
                        shoes_colour='red', accessory='none')
    rendering = render_character(identity, 'standing', 256)
    image = np.asarray(rendering.image, np.int16)
    from anime_pose.synthetic import CLOTH_COLOURS, HAIR_COLOURS
    for part, colour in [('hair', HAIR_COLOURS['pink']), ('top', CLOTH_COLOURS['blue']),
                         ('bottom', CLOTH_COLOURS['yellow']), ('shoes', CLOTH_COLOURS['red'])]:
        pixels = image[erode(erode(rendering.masks == PART_LABELS[part]))]
        assert len(pixels) > 10, part
        assert (np.abs(np.median(pixels, 0) - colour) < 12).all(), part


@pytest.mark.parametrize('size', [64, 256])
def test_keypoints_land_on_the_limbs(size):
    for identity in identities(6, seed=size):
        for name in POSE_LIBRARY:
            rendering = render_character(identity, name, size)
            body = rendering.masks != PART_LABELS['background']
            visible = rendering.keypoints[:, 2] > 0
            for joint in LIMB_JOINTS:
                assert visible[joint] and body[pixel(rendering, joint)], (name, joint)
            for a, b in LIMBS:
                middle = (rendering.keypoints[a, :2] + rendering.keypoints[b, :2]) / 2 * size
                assert body[int(middle[1]), int(middle[0])], (name, a, b)
            for joint in (0, 14, 15, 16, 17):  # nose, eyes and ears on the head
                if visible[joint]: assert rendering.masks[pixel(rendering, joint)] in (PART_LABELS['skin'], PART_LABELS['hair'], PART_LABELS['accessory']), (name, joint)


def test_eyes_drawn_where_the_eye_keypoints_are():
    identity = Identity(hair_style='short', accessory='none', eye_colour='red')
    rendering = render_character(identity, 'standing', 256)
    image = np.asarray(rendering.image, np.int16)
    for eye in (14, 15):
        y, x = pixel(rendering, eye)
        patch = image[y - 6:y + 7, x - 6:x + 7].reshape(-1, 3)
        assert (patch[:, 0] - patch[:, 1] > 80).any()  # red iris pixels around the eye keypoint


# ---- poses ----

def angle(a, b, c):
    u, v = a - b, c - b
    return np.degrees(np.arccos(np.clip(u @ v / np.linalg.norm(u) / np.linalg.norm(v), -1, 1)))


def assert_plausible(keypoints, sizes, name):
    k, visible = keypoints[:, :2], keypoints[:, 2] > 0
    assert visible[1:14].all(), f'{name}: a body joint is hidden'
    assert ((k[visible] > 0) & (k[visible] < 1)).all(), f'{name}: a joint leaves the canvas'
    assert (k[~visible] == 0).all(), f'{name}: a hidden joint is not (0, 0, 0)'
    hips, neck = k[[8, 11]].mean(0), k[1]
    assert neck[1] < hips[1], f'{name}: neck below the hips'
    assert (k[[i for i in (0, 14, 15, 16, 17) if visible[i]], 1] < neck[1]).all(), f'{name}: head below the neck'
    assert (k[[10, 13], 1] > hips[1]).all(), f'{name}: ankle above the hips'
    for (a, b), length in zip(LIMBS, ['upper', 'fore'] * 2 + ['thigh', 'shin'] * 2):
        assert np.linalg.norm(k[a] - k[b]) <= sizes[length] * 1.001, f'{name}: limb {a}-{b} longer than the body allows'
    for shoulder, elbow, wrist in [(2, 3, 4), (5, 6, 7)]:
        assert angle(k[shoulder], k[elbow], k[wrist]) > 30, f'{name}: elbow folded flat'
    assert abs(np.linalg.norm(k[2] - k[1]) - np.linalg.norm(k[5] - k[1])) < 1e-6, f'{name}: shoulders uneven'


@pytest.mark.parametrize('name', list(POSE_LIBRARY))
def test_every_named_pose_is_plausible(name):
    for identity in [Identity(heads_tall=2.3), Identity(heads_tall=5.6), *identities(4)]:
        for spec in [POSE_LIBRARY[name], mirror_pose(POSE_LIBRARY[name])]:
            body = _articulate(spec, identity)
            assert_plausible(body.keypoints, body.sizes, name)


def test_knees_bend_backwards_in_profile():
    for name in ('running', 'side_view'):
        spec = POSE_LIBRARY[name]
        for thigh, shin in [spec.legs[:2], spec.legs[2:]]:
            assert shin <= thigh + 5, name  # facing image right: the shin swings behind the thigh


def test_sampled_poses_stay_plausible():
    rng = np.random.default_rng(0)
    for _ in range(300):
        identity, spec = random_identity(rng), sample_pose(rng)
        body = _articulate(spec, identity)
        assert_plausible(body.keypoints, body.sizes, spec.name)


def test_turning_hides_the_far_eye_and_ear():
    identity = Identity()
    front = _articulate(POSE_LIBRARY['standing'], identity).keypoints
    side = _articulate(POSE_LIBRARY['side_view'], identity).keypoints  # facing image right: the right side is near
    back = _articulate(POSE_LIBRARY['back_view'], identity).keypoints
    assert front[[0, 14, 15, 16, 17], 2].all()
    assert side[[0, 14, 16], 2].all() and not side[[15, 17], 2].any()
    assert not back[[0, 14, 15], 2].any() and back[[16, 17], 2].all()
    assert front[2, 0] < front[5, 0] and back[2, 0] > back[5, 0]


def test_mirror_swaps_sides():
    spec = POSE_LIBRARY['waving']
    a, b = _articulate(spec, Identity()).keypoints, _articulate(mirror_pose(spec), Identity()).keypoints
    swap = [0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16]
    np.testing.assert_allclose(b[swap, 0], 1 - a[:, 0], atol=0.02)
    np.testing.assert_allclose(b[swap, 1], a[:, 1], atol=1e-6)


def test_unknown_pose_and_bad_identity():
    with pytest.raises(AnimePoseError, match="unknown pose 'moonwalk'"): render_character(Identity(), 'moonwalk')
    with pytest.raises(AnimePoseError, match="eye_colour='plaid'"): Identity(eye_colour='plaid')
    with pytest.raises(AnimePoseError, match='size must be between'): render_character(Identity(), 'standing', 4)


# ---- any Pose, not only our own ----

def test_render_any_pose_reads_the_turn_from_visibility():
    identity = Identity()
    for name, yaw in [('standing', 0), ('side_view', 90), ('back_view', 180)]:
        keypoints = _articulate(POSE_LIBRARY[name], identity).keypoints.astype(np.float32)
        body = _body_from_pose(Pose(keypoints, 512, 512), identity)
        assert abs((body.yaw - yaw + 180) % 360 - 180) < 20, name
        rendering = render_character(identity, Pose(keypoints, 512, 512), 64)
        np.testing.assert_allclose(rendering.keypoints, keypoints, atol=1e-6)


def test_render_pose_on_a_wide_canvas_is_letterboxed():
    keypoints = _articulate(POSE_LIBRARY['standing'], Identity()).keypoints.astype(np.float32)
    wide = keypoints.copy()
    wide[:, 0] = (keypoints[:, 0] * 512 + 256) / 1024  # the same figure in the middle of a 1024 x 512 canvas
    rendering = render_character(Identity(), Pose(wide, 1024, 512), 64)
    visible = keypoints[:, 2] > 0  # the 1024 x 512 canvas sits in the middle of a 1024 x 1024 square: x stays, y shrinks
    np.testing.assert_allclose(rendering.keypoints[visible, 0], wide[visible, 0], atol=1e-5)
    np.testing.assert_allclose(rendering.keypoints[visible, 1], (keypoints[visible, 1] * 512 + 256) / 1024, atol=1e-5)


def test_render_sizes():
    for size in (32, 64, 256, 512):
        rendering = render_character(Identity(), 'walking', size)
        assert rendering.image.size == (size, size) and rendering.masks.shape == (size, size)
        assert rendering.pose.width == size and rendering.keypoints.dtype == np.float32


def test_tags():
    tags = identity_tags(Identity(hair_colour='pink', hair_style='twintails', eye_colour='green', heads_tall=2.5,
                                  accessory='cat_ears', bottom='pants', bottom_colour='black'))
    for tag in ['pink_hair', 'twintails', 'green_eyes', 'chibi', 'cat_ears', 'black_pants']: assert tag in tags
    assert 'chibi' not in identity_tags(Identity(heads_tall=5))
    assert 'black_thighhighs' in identity_tags(Identity(bottom='skirt', legwear='thighhighs', legwear_colour='black'))
    assert 'thighhighs' not in identity_tags(Identity(bottom='pants', legwear='thighhighs'))  # hidden by the trousers


def test_masks_image_colours_every_part():
    from anime_pose.synthetic import PART_COLOURS, masks_image
    assert set(PART_COLOURS) == set(PART_LABELS)
    masks = np.array([list(PART_LABELS.values())], np.uint8)
    image = masks_image(masks)
    assert [image.getpixel((i, 0)) for i in range(len(PART_LABELS))] == [PART_COLOURS[p] for p in PART_LABELS]


# ---- command line ----

def test_cli_writes_dataset_and_contact_sheet(tmp_path, capsys):
    out = tmp_path / 'synthetic'
    assert main(['synth', '--out', str(out), '--characters', '3', '--poses-per-character', '2', '--size', '32', '--num-proc', '1']) == 0
    dataset = datasets.load_from_disk(str(out))
    assert set(dataset) == set(SPLITS) and sum(d.num_rows for d in dataset.values()) == 6
    assert dataset['train'][0]['target'].size == (32, 32)
    assert Image.open(out / 'contact_sheet.png').size[0] > 32
    assert 'wrote' in capsys.readouterr().out
    again = ['synth', '--out', str(out), '--characters', '4', '--poses-per-character', '2', '--size', '32', '--num-proc', '1']
    assert main(again) == 1 and '--overwrite' in capsys.readouterr().err  # never replaced unasked
    assert main([*again, '--overwrite']) == 0
    assert sum(d.num_rows for d in datasets.load_from_disk(str(out)).values()) == 8  # a dataset is replaced


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    out = tmp_path / 'synthetic'
    assert main(['synth', '--out', str(out), '--characters', '3', '--poses-per-character', '1']) == 1
    error = capsys.readouterr().err
    assert error.count('\n') == 1 and 'poses_per_character must be at least 2' in error
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path, capsys):
    (tmp_path / 'notes.txt').write_text('keep me')
    assert main(['synth', '--out', str(tmp_path), '--characters', '3', '--poses-per-character', '2']) == 1
    assert 'pass --overwrite' in capsys.readouterr().err
    assert main(['synth', '--out', str(tmp_path), '--characters', '3', '--poses-per-character', '2', '--overwrite']) == 1
    assert 'is not a dataset written by synth' in capsys.readouterr().err  # even when asked
    assert (tmp_path / 'notes.txt').read_text() == 'keep me'


def test_contact_sheet_shows_reference_skeleton_target():
    from anime_pose.synthetic import contact_sheet
    dataset = synthetic_dataset(characters=3, poses_per_character=2, size=64, progress=False)
    sheet = contact_sheet(dataset['train'], count=2, columns=1)
    assert sheet.size == (3 * 128 + 2 * 2, 2 * 128 + 2)  # 64 px drawings enlarged to 128 px cells, 2 px padding
    skeleton = np.asarray(sheet.crop((130, 0, 258, 128)))
    assert (skeleton.max(-1) == 0).mean() > 0.5  # the middle cell is a skeleton on black
    with pytest.raises(AnimePoseError, match='at least one triple'): contact_sheet(dataset['train'], count=0)

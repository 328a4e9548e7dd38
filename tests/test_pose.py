"Poses: every real-world JSON flavour, round trips, bad inputs, ControlNet-identical drawing, retargeting, metrics, detection, CLI."
import json, math, warnings

import numpy as np
import pytest
from PIL import Image

from anime_pose.cli import main
from anime_pose.core import AnimePoseError
from anime_pose.pose import (KEYPOINT_NAMES, LIMBS, OKS_SIGMAS, OpenPoseDetector, Pose, PoseDetector, PoseError,
                             body_size, bone_lengths, detect_pose, draw_skeletons, mean_joint_error, oks, pck,
                             pose_from_joints, poses_to_openpose, read_poses, retarget, save_poses)

with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    from controlnet_aux.open_pose import BodyResult, Keypoint, PoseResult, draw_poses
    from controlnet_aux.open_pose import util as controlnet_util


# ---------------------------------------------------------------- fixtures in every real-world flavour

# A standing person on a 640x480 image, in pixels, COCO-18 order.
STANDING = np.array([[320, 100], [320, 150], [280, 155], [262, 215], [255, 270], [360, 155], [378, 215], [385, 270],
                     [295, 280], [292, 360], [290, 440], [345, 280], [348, 360], [350, 440], [312, 92], [328, 92],
                     [302, 98], [338, 98]], dtype=np.float64)
W, H = 640, 480


def flat(points):
    return [float(v) for point in points for v in point]


def with_confidence(points, confidence):
    return [[x, y, c] for (x, y), c in zip(points, np.broadcast_to(confidence, len(points)))]


def to_body25(coco18):
    "BODY_25 from COCO-18 triplets: mid-hip inserted at 8, six foot points appended."
    mid_hip = [(coco18[8][0] + coco18[11][0]) / 2, (coco18[8][1] + coco18[11][1]) / 2, 0.6]
    return coco18[:8] + [mid_hip] + coco18[8:] + [[coco18[13][0] + 5, 445, 0.5]] * 3 + [[coco18[10][0] - 5, 445, 0.5]] * 3


def hand_points(wrist, scale=1.0):
    "21 plausible hand points around a wrist, in pixels."
    return [[wrist[0] + scale * 3 * (i % 5), wrist[1] + scale * 4 * (i // 5 + 1)] for i in range(21)]


def face_points(nose, count=70):
    return [[nose[0] - 15 + (i % 10) * 3, nose[1] - 10 + (i // 10) * 3] for i in range(count)]


@pytest.fixture
def openpose_native():
    "OpenPose --write_json v1.3: BODY_25 pixels, no canvas, 3 people, 0,0,0 joints, low confidences, [] parts."
    confidences = np.linspace(0.95, 0.6, 18)
    big = with_confidence(STANDING, confidences)
    small = with_confidence(STANDING * 0.5 + [20, 20], 0.8)
    sparse = with_confidence(STANDING * 0.3 + [500, 300], 0.07)
    for i in (3, 4, 6, 7, 9, 10, 12, 13, 16, 17, 0): sparse[i] = [0, 0, 0]
    big[17] = [0, 0, 0]
    big[0][2] = 0.01  # below the default body threshold of 0.05
    people = [{'person_id': [-1], 'pose_keypoints_2d': flat(to_body25(p)), 'face_keypoints_2d': [],
               'hand_left_keypoints_2d': [], 'hand_right_keypoints_2d': [], 'pose_keypoints_3d': []}
              for p in (small, big, sparse)]
    return {'version': 1.3, 'people': people}


@pytest.fixture
def openpose_v12_zero_parts():
    "OpenPose v1.2: no person_id, face and right hand present as full-length arrays of zeros, left hand junk-confident."
    body = to_body25(with_confidence(STANDING, 0.7))
    left = with_confidence(hand_points(STANDING[7]), 0.1)  # below the hand threshold of 0.2
    return {'version': 1.2, 'people': [{'pose_keypoints_2d': flat(body), 'face_keypoints_2d': [0] * 210,
                                        'hand_left_keypoints_2d': flat(left), 'hand_right_keypoints_2d': [0] * 63}]}


@pytest.fixture
def openpose_v10():
    "OpenPose v1.0 (VITON): key pose_keypoints, COCO-18, integer pixels, two missing joints."
    body = [[int(round(x)), int(round(y)), 0.5] for x, y in STANDING]
    body[10] = body[13] = [0, 0, 0]
    return {'version': 1.0, 'people': [{'face_keypoints': [], 'pose_keypoints': flat(body),
                                        'hand_right_keypoints': [], 'hand_left_keypoints': []}]}


@pytest.fixture
def controlnet_json():
    """sd-webui-controlnet / controlnet_aux: normalised, canvas keys, c=1.0, face null, hands with -1/W,-1/H not-found points.
    As ControlNet writes them, body joints are float64 k/W and hand points float32 values (its hand detector computes in float32)."""
    body = [[x / W, y / H, 1.0] for x, y in STANDING]
    body[16] = [0.0, 0.0, 0.0]
    float32 = lambda v: float(np.float32(v))
    left = [[float32(x / W), float32(y / H), 1.0] for x, y in hand_points(STANDING[7] + 0.5)]
    left[4] = [float32(-1 / W), float32(-1 / H), 1.0]
    right = [[float32(x / W), float32(y / H), 1.0] for x, y in hand_points(STANDING[4])]
    return {'people': [{'pose_keypoints_2d': flat(body), 'face_keypoints_2d': None,
                        'hand_left_keypoints_2d': flat(left), 'hand_right_keypoints_2d': flat(right)}],
            'canvas_height': H, 'canvas_width': W}


@pytest.fixture
def editor_json():
    "Pose-editor export: pixels with the canvas, int and float values mixed, int confidences, legs below the canvas."
    body = [[int(x) if i % 2 else float(x) + 0.25, y * 1.3, 1] for i, (x, y) in enumerate(STANDING)]
    body[15] = [0, 0, 0]
    return {'people': [{'pose_keypoints_2d': flat(body), 'hand_right_keypoints_2d': flat(with_confidence(hand_points(STANDING[4]), 1)),
                        'hand_left_keypoints_2d': flat(with_confidence(hand_points(STANDING[7]), 1))}],
            'canvas_width': W, 'canvas_height': H}


@pytest.fixture
def comfyui_frames():
    "ComfyUI POSE_KEYPOINT: a list of frames, pixels, two people, DWPose 70-point face (68 + body eyes), a half-missing hand."
    def person(points, confidence=1.0):
        body = with_confidence(points, confidence)
        face = with_confidence(face_points(points[0], 68), 1.0) + [body[14], body[15]]
        right = with_confidence(hand_points(points[4]), 1.0)
        for i in range(10, 21): right[i] = [0, 0, 0]
        return {'pose_keypoints_2d': flat(body), 'face_keypoints_2d': flat(face),
                'hand_left_keypoints_2d': flat(with_confidence(hand_points(points[7]), 1.0)), 'hand_right_keypoints_2d': flat(right)}
    frame = {'people': [person(STANDING * 0.6 + [10, 40]), person(STANDING)], 'canvas_height': H, 'canvas_width': W}
    second = {'people': [person(STANDING + [30, 0])], 'canvas_height': H, 'canvas_width': W}
    return [frame, second]


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ---------------------------------------------------------------- reading every flavour

def test_keypoint_names_are_controlnets_coco18_order():
    assert len(KEYPOINT_NAMES) == 18 and KEYPOINT_NAMES[:2] == ['nose', 'neck'] and KEYPOINT_NAMES[8] == 'right_hip'
    assert KEYPOINT_NAMES[14:] == ['right_eye', 'left_eye', 'right_ear', 'left_ear']


def test_openpose_native_body25_pixels_needs_the_canvas(tmp_path, openpose_native):
    path = write(tmp_path, 'keypoints.json', openpose_native)
    with pytest.raises(PoseError, match=r"keypoints.json': coordinates are in pixels and the file has no canvas size.*--canvas"):
        Pose.from_openpose(path)
    pose = Pose.from_openpose(path, canvas=(W, H))
    assert (pose.width, pose.height) == (W, H)
    visible = pose.visible
    assert not visible[17] and not visible[0]  # 0,0,0 and a 0.01 confidence are both missing
    np.testing.assert_allclose(pose.keypoints[visible, :2], (STANDING / (W, H))[visible], atol=1e-6)  # mid-hip and feet dropped
    np.testing.assert_allclose(pose.keypoints[2, 2], np.linspace(0.95, 0.6, 18)[2], atol=1e-6)  # real confidences kept
    assert pose.hands is None and pose.face is None


def test_openpose_native_several_people_default_is_the_largest(openpose_native):
    people = read_poses(openpose_native, canvas=(W, H))
    assert len(people) == 3
    largest = Pose.from_openpose(openpose_native, canvas=(W, H))
    np.testing.assert_allclose(largest.keypoints[1, :2], STANDING[1] / (W, H), atol=1e-6)
    small = Pose.from_openpose(openpose_native, canvas=(W, H), person=0)
    np.testing.assert_allclose(small.keypoints[1, :2], (STANDING[1] * 0.5 + 20) / (W, H), atol=1e-6)
    with pytest.raises(PoseError, match='person 3 requested but the file has 3 people'):
        Pose.from_openpose(openpose_native, canvas=(W, H), person=3)


def test_low_confidence_people_follow_min_confidence(openpose_native):
    # person 2's joints are all 0.07: above the default body threshold (0.05), below 0.1
    assert Pose.from_openpose(openpose_native, canvas=(W, H), person=2).visible.sum() == 7
    with pytest.raises(PoseError, match='person 2 has 0 visible body joints, fewer than one limb needs'):
        Pose.from_openpose(openpose_native, canvas=(W, H), person=2, min_confidence=0.1)
    # ControlNet's own rule (drop everything below 1.0) erases a real OpenPose file: we say so instead of drawing nothing
    with pytest.raises(PoseError, match='no usable body'):
        Pose.from_openpose(openpose_native, canvas=(W, H), min_confidence=1.0)
    assert Pose.from_openpose(openpose_native, canvas=(W, H), min_confidence=0.0).visible[0]


def test_min_confidence_is_validated(openpose_native):
    for bad in (-0.1, 1.5, 'high'):
        with pytest.raises(PoseError, match='min_confidence must be a number between 0 and 1'):
            Pose.from_openpose(openpose_native, canvas=(W, H), min_confidence=bad)


def test_openpose_v12_zero_arrays_and_junk_hands_are_absent(openpose_v12_zero_parts):
    pose = Pose.from_openpose(openpose_v12_zero_parts, canvas=(W, H))
    assert pose.face is None and pose.hands is None  # zeros everywhere, and left hand below the 0.2 hand threshold
    kept = Pose.from_openpose(openpose_v12_zero_parts, canvas=(W, H), min_confidence=0.05)
    assert kept.hands is not None and kept.hands[0, :, 2].all() and not kept.hands[1, :, 2].any()


def test_openpose_v10_pose_keypoints_integer_pixels(tmp_path, openpose_v10):
    pose = Pose.from_openpose(write(tmp_path, 'viton.json', openpose_v10), canvas=(W, H))
    assert pose.visible.sum() == 16 and not pose.visible[10] and not pose.visible[13]
    np.testing.assert_allclose(pose.keypoints[pose.visible, :2], (np.round(STANDING) / (W, H))[pose.visible], atol=1e-6)


def test_controlnet_normalised_with_null_face_and_not_found_hand_points(tmp_path, controlnet_json):
    pose = Pose.from_openpose(write(tmp_path, 'controlnet.json', controlnet_json), canvas=(10, 10))
    assert (pose.width, pose.height) == (W, H)  # the file's canvas is trusted over canvas=
    assert pose.face is None and pose.visible.sum() == 17
    np.testing.assert_allclose(pose.keypoints[0, :2], STANDING[0] / (W, H), atol=1e-6)
    assert pose.hands.shape == (2, 21, 3)
    assert pose.hands[0, 4, 2] == 0 and pose.hands[0, :, 2].sum() == 20 and pose.hands[1, :, 2].sum() == 21


def test_editor_pixels_keep_points_outside_the_canvas(editor_json):
    pose = Pose.from_openpose(json.dumps(editor_json))
    assert (pose.width, pose.height) == (W, H) and pose.visible.sum() == 17
    assert pose.keypoints[:, 1].max() > 1.0  # ankles below the bottom edge are kept
    np.testing.assert_allclose(pose.keypoints[13, :2], STANDING[13] * (1, 1.3) / (W, H), atol=1e-6)


def test_comfyui_list_of_frames_with_two_people_and_dwpose_faces(tmp_path, comfyui_frames):
    path = write(tmp_path, 'PoseKeypoint_00001.json', comfyui_frames)
    assert len(read_poses(path)) == 2
    pose = Pose.from_openpose(path)
    np.testing.assert_allclose(pose.keypoints[1, :2], STANDING[1] / (W, H), atol=1e-6)  # the larger person
    assert pose.face.shape == (70, 3) and pose.face[:, 2].all()
    np.testing.assert_allclose(pose.face[68:], pose.keypoints[14:16], atol=1e-6)
    assert pose.hands[1, :, 2].sum() == 10
    second = Pose.from_openpose(path, frame=1)
    np.testing.assert_allclose(second.keypoints[1, :2], (STANDING[1] + [30, 0]) / (W, H), atol=1e-6)
    with pytest.raises(PoseError, match='frame 2 requested but the file has 2 frames'):
        Pose.from_openpose(path, frame=2)


def test_dwpose_68_point_face_is_padded_with_the_body_eyes(controlnet_json):
    face = [[x / W, y / H, 1.0] for x, y in face_points(STANDING[0], 68)]
    pose = Pose.from_openpose({**controlnet_json, 'people': [{**controlnet_json['people'][0], 'face_keypoints_2d': flat(face)}]})
    assert pose.face.shape == (70, 3)
    np.testing.assert_allclose(pose.face[68:], pose.keypoints[14:16])


def test_normalised_cropped_body_is_still_normalised(controlnet_json):
    values = list(controlnet_json['people'][0]['pose_keypoints_2d'])
    values[10 * 3 + 1] = values[13 * 3 + 1] = 1.4  # both ankles below the bottom edge
    pose = Pose.from_openpose({**controlnet_json, 'people': [{'pose_keypoints_2d': values}]})
    np.testing.assert_allclose(pose.keypoints[[1, 10], 1], [STANDING[1, 1] / H, 1.4], rtol=1e-6)


def test_nested_triplets_are_accepted(controlnet_json):
    values = controlnet_json['people'][0]['pose_keypoints_2d']
    nested = {**controlnet_json, 'people': [{'pose_keypoints_2d': [values[i:i + 3] for i in range(0, 54, 3)]}]}
    np.testing.assert_array_equal(Pose.from_openpose(nested).keypoints, Pose.from_openpose(controlnet_json).keypoints)


def test_normalised_file_without_canvas_gets_the_given_or_default_canvas(controlnet_json):
    data = {'people': controlnet_json['people']}
    assert (Pose.from_openpose(data).width, Pose.from_openpose(data).height) == (512, 512)
    assert (Pose.from_openpose(data, canvas=(W, H)).width, Pose.from_openpose(data, canvas=(W, H)).height) == (W, H)


# ---------------------------------------------------------------- bad inputs: a clear error naming the file

@pytest.mark.parametrize('content, message', [
    ('This is a bad json.', 'not valid JSON'),
    ('', 'file is empty'),
    ('{"version": "ap10k", "animals": [[450.2, 131.6, 1.0]], "canvas_height": 512, "canvas_width": 960}', 'animals only'),
    ('{"version": 1.3, "people": []}', 'no people in the file'),
    ('{"version": 1.3}', 'no "people" key'),
    ('42', 'expected an OpenPose JSON object'),
    ('[]', 'an empty list of frames'),
    ('{"people": {"pose_keypoints_2d": []}}', '"people" must be a list'),
    ('{"people": ["nobody"]}', 'person 0 must be an object'),
    ('{"people": [{"pose_keypoints_2d": [0.5, 0.5, 1.0, 0.5]}]}', 'body has 4 values; expected 54 or 75'),
    ('{"people": [{"pose_keypoints_2d": [' + ', '.join(['"0.5"'] * 54) + ']}]}', "value 0 is '0.5', not a number"),
    ('{"people": [{"pose_keypoints_2d": [' + ', '.join(['true'] * 54) + ']}]}', 'value 0 is True, not a number'),
    ('{"people": [{"pose_keypoints_2d": [' + ', '.join(['NaN'] * 54) + ']}]}', 'NaN or infinite'),
    ('{"people": [{"pose_keypoints_2d": [' + ', '.join(['Infinity'] * 54) + ']}]}', 'NaN or infinite'),
    ('{"people": [{"pose_keypoints_2d": 12}]}', 'body must be a list of numbers'),
    ('{"people": [{"pose_keypoints_2d": [0.5, 0.5, 1.0], "hand_left_keypoints_2d": []}]}', 'body has 3 values'),
    ('{"people": [{"pose_keypoints_2d": [0.5, 0.5, 1.0' + ', 0' * 51 + ']}]}', 'fewer than one limb needs'),
    ('{"people": [{"face_keypoints_2d": []}]}', 'person 0 has no body keypoints'),
    ('{"people": [{"pose_keypoints_2d": [' + ', '.join(['1e9, 1e9, 1'] * 18) + ']}], "canvas_width": 512, "canvas_height": 512}', 'absurd coordinates'),
    ('{"people": [{"pose_keypoints_2d": [' + ', '.join(['100, 100, 1'] * 18) + ']}], "canvas_width": 0, "canvas_height": 512}', 'canvas_width and canvas_height must be positive'),
    ('{"people": [{"pose_keypoints_2d": [' + ', '.join(['100, 100, 1'] * 18) + ']}], "canvas_width": "512", "canvas_height": 512}', 'canvas_width and canvas_height must be positive'),
])
def test_bad_pose_files_raise_a_clear_error_naming_the_file(tmp_path, content, message):
    path = write(tmp_path, 'bad_pose.json', content)
    with pytest.raises(PoseError, match=message) as error:
        Pose.from_openpose(path)
    assert "'" + str(path) + "'" in str(error.value)
    assert isinstance(error.value, AnimePoseError) and isinstance(error.value, ValueError)


def test_missing_file_directory_and_non_utf8(tmp_path):
    with pytest.raises(PoseError, match='no such file'): Pose.from_openpose(tmp_path / 'missing.json')
    with pytest.raises(PoseError, match='is a directory'): Pose.from_openpose(tmp_path)
    (tmp_path / 'binary.json').write_bytes(b'\xff\xfe\x00\x81')
    with pytest.raises(PoseError, match='not UTF-8'): Pose.from_openpose(tmp_path / 'binary.json')
    with pytest.raises(PoseError, match='cannot read a pose from int'): Pose.from_openpose(3)


def test_pixel_coordinates_too_far_outside_a_given_canvas_are_absurd(openpose_native):
    with pytest.raises(PoseError, match=r'absurd coordinates .* on a 8x8 canvas\); check the canvas size'):
        Pose.from_openpose(openpose_native, canvas=(8, 8))


def test_pose_constructor_validates():
    with pytest.raises(PoseError, match=r'shape \(18, 3\)'): Pose(np.zeros((25, 3)), 64, 64)
    with pytest.raises(PoseError, match='NaN or infinite'): Pose(np.full((18, 3), np.inf), 64, 64)
    with pytest.raises(PoseError, match='canvas must be at least 1x1'): Pose(np.zeros((18, 3)), 0, 64)
    with pytest.raises(PoseError, match=r'hands \[left, right\] must have shape \(2, 21, 3\)'): Pose(np.zeros((18, 3)), 64, 64, hands=np.zeros((2, 20, 3)))
    with pytest.raises(PoseError, match='unknown joint names'): pose_from_joints({'tail': (1, 1)}, 64, 64)


# ---------------------------------------------------------------- writing and round trips

def test_to_openpose_is_the_controlnet_flavour(controlnet_json):
    pose = Pose.from_openpose(controlnet_json)
    data = pose.to_openpose()
    assert list(data) == ['people', 'canvas_height', 'canvas_width'] and (data['canvas_width'], data['canvas_height']) == (W, H)
    person = data['people'][0]
    assert list(person) == ['pose_keypoints_2d', 'face_keypoints_2d', 'hand_left_keypoints_2d', 'hand_right_keypoints_2d']
    assert person['face_keypoints_2d'] is None and person['pose_keypoints_2d'][48:51] == [0.0, 0.0, 0.0]
    assert set(person['pose_keypoints_2d'][2::3]) == {0.0, 1.0}
    np.testing.assert_allclose(person['hand_left_keypoints_2d'][12:15], [-1 / W, -1 / H, 1.0])  # not found, as ControlNet writes it


def test_round_trip_through_the_controlnet_flavour(tmp_path, comfyui_frames, openpose_native):
    for original in (Pose.from_openpose(comfyui_frames), Pose.from_openpose(openpose_native, canvas=(W, H))):
        path = original.save(tmp_path / 'pose.json')
        again = Pose.from_openpose(path)
        assert (again.width, again.height) == (original.width, original.height)
        np.testing.assert_array_equal(again.keypoints[:, :2], original.keypoints[:, :2])
        np.testing.assert_array_equal(again.visible, original.visible)
        assert (again.keypoints[again.visible, 2] == 1.0).all()  # ControlNet's "present"
        for part, part_again in ((original.hands, again.hands), (original.face, again.face)):
            assert (part is None) == (part_again is None)
            if part is not None:
                np.testing.assert_array_equal(part_again[..., :2], part[..., :2])
                np.testing.assert_array_equal(part_again[..., 2] > 0, part[..., 2] > 0)
        assert original.to_openpose() == again.to_openpose()


def test_several_people_round_trip(tmp_path, comfyui_frames):
    people = read_poses(comfyui_frames)
    again = read_poses(save_poses(people, tmp_path / 'people.json'))
    assert len(again) == 2
    for before, after in zip(people, again): np.testing.assert_array_equal(before.keypoints[:, :2], after.keypoints[:, :2])
    assert poses_to_openpose(people)['people'][1] == people[1].to_openpose()['people'][0]


def test_resized_keeps_normalised_coordinates(controlnet_json):
    pose = Pose.from_openpose(controlnet_json)
    bigger = pose.resized(1280, 960)
    np.testing.assert_array_equal(bigger.keypoints, pose.keypoints)
    assert (bigger.width, bigger.height) == (1280, 960)


# ---------------------------------------------------------------- ControlNet-identical skeleton images

def controlnet_decode(data: dict, frame_people=None):
    "What ControlNet's decode_json_as_poses does, written independently: a point is kept when c >= 1.0, else None."
    def points(values):
        if not values: return None
        return [Keypoint(x, y) if c >= 1.0 else None for x, y, c in zip(values[0::3], values[1::3], values[2::3])]
    return [PoseResult(BodyResult(points(p['pose_keypoints_2d']), 0.0, 0), points(p.get('hand_left_keypoints_2d')),
                       points(p.get('hand_right_keypoints_2d')), points(p.get('face_keypoints_2d')))
            for p in (frame_people or data['people'])]


@pytest.mark.parametrize('size', [None, (512, 512), (768, 256), (333, 999)])
def test_skeleton_image_is_pixel_identical_to_controlnet_aux(controlnet_json, size):
    pose = Pose.from_openpose(controlnet_json)
    width, height = size or (W, H)
    expected = draw_poses(controlnet_decode(controlnet_json), height, width, draw_body=True, draw_hand=False, draw_face=False)
    image = pose.skeleton_image(*(size or ()))
    assert image.mode == 'RGB' and image.size == (width, height)
    np.testing.assert_array_equal(np.asarray(image), expected)
    assert np.asarray(image).any()


def test_skeleton_image_with_hands_and_face_is_pixel_identical(controlnet_json, comfyui_frames):
    # ControlNet's own file, and what ControlNet would read from the JSON we write for a ComfyUI pose
    for pose, data in ((Pose.from_openpose(controlnet_json), controlnet_json), (Pose.from_openpose(comfyui_frames), None)):
        data = data or pose.to_openpose()
        for hands, face in ((True, False), (False, True), (True, True)):
            expected = draw_poses(controlnet_decode(data), 384, 512, draw_body=True, draw_hand=hands, draw_face=face)
            np.testing.assert_array_equal(np.asarray(pose.skeleton_image(512, 384, hands=hands, face=face)), expected)
        assert (np.asarray(pose.skeleton_image(hands=True)) != np.asarray(pose.skeleton_image())).any()


def test_body_drawing_matches_draw_bodypose_on_real_style_poses(openpose_native, editor_json, openpose_v10):
    # OpenPose-native pixels and confidences, an editor body leaving the canvas (drawn clipped), integer v1.0 pixels;
    # ControlNet sees each as its pixel values divided by the canvas, in float64
    editor_pixels = np.array(editor_json['people'][0]['pose_keypoints_2d'], dtype=np.float64).reshape(18, 3)[:, :2]
    cases = [(Pose.from_openpose(openpose_native, canvas=(W, H)), STANDING), (Pose.from_openpose(editor_json), editor_pixels),
             (Pose.from_openpose(openpose_v10, canvas=(W, H)), np.round(STANDING))]
    for pose, pixels in cases:
        keypoints = [Keypoint(x / W, y / H) if visible else None for (x, y), visible in zip(pixels.tolist(), pose.visible)]
        for size in ((W, H), (512, 512)):
            expected = controlnet_util.draw_bodypose(np.zeros((size[1], size[0], 3), np.uint8), keypoints)
            np.testing.assert_array_equal(np.asarray(pose.skeleton_image(*size)), expected)


def test_drawing_follows_changed_keypoints(controlnet_json):
    pose = Pose.from_openpose(controlnet_json)
    pose.keypoints[4, :2] = [0.9031, 0.0517]  # the values read no longer apply to this joint
    keypoints = [Keypoint(float(x), float(y)) if c > 0 else None for x, y, c in pose.keypoints]
    keypoints[:4] = [Keypoint(x / W, y / H) for x, y in STANDING[:4]]  # the others still draw from the float64 values read
    keypoints[5:] = [Keypoint(x / W, y / H) if c > 0 else None for (x, y), c in zip(STANDING[5:], pose.keypoints[5:, 2])]
    np.testing.assert_array_equal(np.asarray(pose.skeleton_image()), controlnet_util.draw_bodypose(np.zeros((H, W, 3), np.uint8), keypoints))
    assert Pose.from_openpose(pose.to_openpose()).keypoints[4, 0] == np.float32(0.9031)


def test_several_people_are_drawn_together(comfyui_frames):
    people = read_poses(comfyui_frames)
    frame = poses_to_openpose(people)
    expected = draw_poses(controlnet_decode(frame), H, W, draw_body=True, draw_hand=False, draw_face=False)
    np.testing.assert_array_equal(np.asarray(draw_skeletons(people)), expected)


def test_skeleton_size_defaults_and_aspect(controlnet_json):
    pose = Pose.from_openpose(controlnet_json)
    assert pose.skeleton_image().size == (W, H)
    assert pose.skeleton_image(320).size == (320, 240)
    assert pose.skeleton_image(height=120).size == (160, 120)
    with pytest.raises(PoseError, match='at least 1x1'): pose.skeleton_image(0, 10)
    with pytest.raises(PoseError, match='at least one pose'): draw_skeletons([])


# ---------------------------------------------------------------- retargeting

def tall_pose():
    return pose_from_joints(dict(
        nose=(256, 110), neck=(256, 160), right_shoulder=(210, 170), right_elbow=(172, 112), right_wrist=(150, 52),
        left_shoulder=(302, 170), left_elbow=(344, 232), left_wrist=(372, 300), right_hip=(228, 390), right_knee=(216, 530),
        right_ankle=(206, 684), left_hip=(284, 390), left_knee=(318, 522), left_ankle=(342, 672),
        right_eye=(247, 100), left_eye=(265, 100), right_ear=(236, 106), left_ear=(276, 106)), 512, 768)


def chibi_pose():
    return pose_from_joints(dict(
        nose=(256, 170), neck=(256, 270), right_shoulder=(218, 280), right_elbow=(198, 326), right_wrist=(188, 366),
        left_shoulder=(294, 280), left_elbow=(314, 326), left_wrist=(324, 366), right_hip=(234, 372), right_knee=(230, 418),
        right_ankle=(228, 462), left_hip=(278, 372), left_knee=(282, 418), left_ankle=(284, 462),
        right_eye=(228, 150), left_eye=(284, 150), right_ear=(196, 164), left_ear=(316, 164)), 512, 512)


def angles(pose):
    xy = pose.keypoints[:, :2].astype(np.float64) * (pose.width, pose.height)
    return np.array([math.atan2(*(xy[b] - xy[a])[::-1]) for a, b in LIMBS])


def test_retarget_keeps_angles_and_takes_the_references_proportions():
    tall, chibi = tall_pose(), chibi_pose()
    result = retarget(tall, chibi)
    assert (result.width, result.height) == (tall.width, tall.height)
    np.testing.assert_allclose(angles(result), angles(tall), atol=1e-4)
    ratios = bone_lengths(result) / bone_lengths(chibi)
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-3)  # one common scale: the chibi's proportions
    head_to_leg = lambda p: bone_lengths(p)[LIMBS.index((1, 0))] / bone_lengths(p)[LIMBS.index((9, 10))]
    assert head_to_leg(result) == pytest.approx(head_to_leg(chibi), rel=1e-3) and head_to_leg(result) > 2 * head_to_leg(tall)
    assert ((result.keypoints[:, :2] >= 0) & (result.keypoints[:, :2] <= 1)).all()  # fitted to the canvas
    feet = lambda p: p.keypoints[:, 1].max() * p.height
    assert feet(result) == pytest.approx(feet(tall), abs=0.5)  # stands where B stood


def test_retarget_onto_itself_is_the_identity_and_keeps_missing_joints_missing(controlnet_json):
    pose = Pose.from_openpose(controlnet_json)
    same = retarget(pose, pose)
    np.testing.assert_allclose(same.keypoints, pose.keypoints, atol=1e-5)
    np.testing.assert_allclose(same.hands, pose.hands, atol=1e-5)


def test_retarget_carries_hands_and_face_with_wrists_and_nose(comfyui_frames):
    pose = Pose.from_openpose(comfyui_frames)
    result = retarget(pose, chibi_pose())
    for side, wrist in ((0, 7), (1, 4)):
        before = pose.hands[side][pose.hands[side, :, 2] > 0, :2] * (W, H) - pose.keypoints[wrist, :2] * (W, H)
        after = result.hands[side][result.hands[side, :, 2] > 0, :2] * (W, H) - result.keypoints[wrist, :2] * (W, H)
        scale = np.linalg.norm(after, axis=1).sum() / np.linalg.norm(before, axis=1).sum()
        np.testing.assert_allclose(after, before * scale, atol=1e-3)  # same hand shape, moved with the wrist
    assert result.face.shape == (70, 3) and (result.face[:, 2] > 0).sum() == (pose.face[:, 2] > 0).sum()
    head = lambda p: sum(np.linalg.norm((p.keypoints[a, :2] - p.keypoints[b, :2]) * (W, H)) for a, b in ((0, 14), (14, 16), (0, 15), (15, 17))
                         if p.keypoints[a, 2] > 0 and p.keypoints[b, 2] > 0)
    spread = lambda p: np.ptp(p.face[:, 0]) * W
    assert spread(result) / spread(pose) == pytest.approx(head(result) / head(pose), rel=1e-4)


def test_retarget_keeps_joints_whose_parent_is_missing(comfyui_frames):
    tall, chibi = tall_pose(), chibi_pose()
    no_right_eye = Pose(tall.keypoints * (np.arange(18) != 14)[:, None], 512, 768)
    result = retarget(no_right_eye, chibi)
    np.testing.assert_array_equal(result.visible, no_right_eye.visible)  # the right ear hangs from the nose
    pose = Pose.from_openpose(comfyui_frames)
    no_elbow = Pose(pose.keypoints * (np.arange(18) != 6)[:, None], W, H, pose.hands, pose.face)
    result = retarget(no_elbow, chibi)
    assert result.visible[7] and not result.visible[6]
    hand = result.hands[0]
    assert hand[:, 2].all() and np.isfinite(hand).all()
    offsets = lambda p: p.hands[0, :, :2] * (W, H) - p.keypoints[7, :2] * (W, H)
    ratio = np.linalg.norm(offsets(result), axis=1) / np.maximum(np.linalg.norm(offsets(no_elbow), axis=1), 1e-9)
    np.testing.assert_allclose(ratio[np.linalg.norm(offsets(no_elbow), axis=1) > 1], np.median(ratio), rtol=1e-3)  # hand scaled as a whole


def test_retarget_fills_bones_the_reference_lacks_from_mirrors_and_scale():
    tall, chibi = tall_pose(), chibi_pose()
    one_legged = Pose(chibi.keypoints * np.isin(np.arange(18), [12, 13], invert=True)[:, None], 512, 512)
    result = retarget(tall, one_legged)
    assert result.visible.all()
    lengths = bone_lengths(result)
    assert lengths[LIMBS.index((11, 12))] == pytest.approx(lengths[LIMBS.index((8, 9))], rel=1e-3)  # mirrored right thigh


def test_retarget_stays_inside_the_canvas_for_a_wide_reference():
    tall = tall_pose()
    wide = pose_from_joints({**{n: tuple(v) for n, v in zip(KEYPOINT_NAMES, (chibi_pose().keypoints[:, :2] * 512).tolist())},
                             'right_elbow': (20, 280), 'right_wrist': (-200, 280)}, 512, 512)
    result = retarget(tall, wide)
    assert ((result.keypoints[:, :2] >= -1e-6) & (result.keypoints[:, :2] <= 1 + 1e-6)).all()


def test_retarget_errors():
    arm = pose_from_joints({'right_shoulder': (1, 1), 'right_elbow': (2, 2)}, 8, 8)
    head = pose_from_joints({'nose': (4, 1), 'neck': (4, 3)}, 8, 8)
    with pytest.raises(PoseError, match='no bone is visible in both'): retarget(arm, head)
    with pytest.raises(PoseError, match='neither a neck nor both shoulders'): retarget(arm, tall_pose())


def test_retarget_without_neck_uses_the_mid_shoulder():
    tall = tall_pose()
    neckless = Pose(tall.keypoints * (np.arange(18) != 1)[:, None], 512, 768)
    result = retarget(neckless, chibi_pose())
    assert result.visible[1] and result.visible.all()


# ---------------------------------------------------------------- metrics

def shifted(pose, joint, dx_pixels):
    keypoints = pose.keypoints.copy()
    keypoints[joint, 0] += dx_pixels / pose.width
    return Pose(keypoints, pose.width, pose.height)


def test_metrics_of_a_pose_with_itself():
    tall = tall_pose()
    assert pck(tall, tall) == 1.0 and oks(tall, tall) == 1.0 and mean_joint_error(tall, tall) == 0.0


def test_pck_counts_joints_within_the_threshold_of_body_size():
    tall = tall_pose()
    size = body_size(tall)
    assert size == pytest.approx(684 - 52, abs=1e-3)
    assert pck(shifted(tall, 4, 0.09 * size), tall) == 1.0
    assert pck(shifted(tall, 4, 0.11 * size), tall) == pytest.approx(17 / 18)
    assert pck(shifted(tall, 4, 0.11 * size), tall, threshold=0.2) == 1.0
    missing = Pose(tall.keypoints * (np.arange(18) != 4)[:, None], 512, 768)
    assert pck(missing, tall) == pytest.approx(17 / 18)


def test_oks_follows_the_coco_formula():
    tall = tall_pose()
    xy = tall.keypoints[:, :2] * (512, 768)
    area = np.prod(xy.max(0) - xy.min(0))
    d = 12.0
    expected = (16 + math.exp(-d ** 2 / (2 * area * (2 * OKS_SIGMAS[0]) ** 2))) / 17  # 17 COCO joints: the neck has no sigma
    assert oks(shifted(tall, 0, d), tall) == pytest.approx(expected, rel=1e-5)
    assert oks(shifted(tall, 1, 1000), tall) == pytest.approx(1.0)  # the neck is not scored
    missing = Pose(tall.keypoints * (np.arange(18) != 0)[:, None], 512, 768)
    assert oks(missing, tall) == pytest.approx(16 / 17)


def test_mean_joint_error_over_shared_joints():
    tall = tall_pose()
    assert mean_joint_error(shifted(tall, 4, 18), tall) == pytest.approx(1.0, abs=1e-3)
    assert mean_joint_error(shifted(tall, 4, 18), tall, relative=True) == pytest.approx(1.0 / body_size(tall), rel=1e-3)
    missing = Pose(shifted(tall, 4, 18).keypoints * (np.arange(18) != 4)[:, None], 512, 768)
    assert mean_joint_error(missing, tall) == pytest.approx(0.0, abs=1e-4)
    nobody_shared = pose_from_joints({'nose': (1, 1), 'neck': (1, 2)}, 512, 768)
    assert math.isnan(mean_joint_error(Pose(tall.keypoints * (np.arange(18) > 1)[:, None], 512, 768), nobody_shared))


def test_metrics_reject_targets_without_a_body():
    tall = tall_pose()
    empty = Pose(np.zeros((18, 3)), 512, 768)
    with pytest.raises(PoseError, match='fewer than 2 visible joints'): pck(tall, empty)
    flat_line = pose_from_joints({'neck': (10, 10), 'nose': (10, 5)}, 64, 64)
    with pytest.raises(PoseError, match='no area'): oks(tall, flat_line)


# ---------------------------------------------------------------- detection

class Stub:
    "A detector that returns fixed poses."
    def __init__(self, poses): self.poses = poses
    def detect(self, image): return self.poses
    def __repr__(self): return 'Stub'


def test_detector_protocol_and_detect_pose(tmp_path):
    image = tmp_path / 'picture.png'
    Image.new('RGB', (512, 768)).save(image)
    tall, chibi = tall_pose(), chibi_pose()
    assert isinstance(Stub([]), PoseDetector)
    assert detect_pose(image, Stub([chibi, tall])) is tall
    assert detect_pose(image, Stub([chibi, tall]), person=0) is chibi
    with pytest.raises(PoseError, match=r"picture.png': Stub found no person"): detect_pose(image, Stub([]))
    with pytest.raises(PoseError, match='person 2 requested but 2 were found'): detect_pose(image, Stub([chibi, tall]), person=2)
    with pytest.raises(AnimePoseError, match='no such file'): detect_pose(tmp_path / 'missing.png', Stub([tall]))


class FakeOpenpose:
    "Stands in for controlnet_aux's OpenposeDetector: returns normalised PoseResults like detect_poses."
    def __init__(self, results): self.results, self.seen = results, None
    def detect_poses(self, image, include_hand=False, include_face=False):
        self.seen = (image.shape, include_hand, include_face)
        return self.results


def test_openpose_detector_reads_controlnet_aux_results():
    tall = tall_pose()
    body = BodyResult([Keypoint(float(x), float(y)) for x, y, _ in tall.keypoints], 18.0, 18)
    hand = [Keypoint(0.5, 0.5)] * 20 + [Keypoint(-1 / 512, -1 / 512)]
    lonely = BodyResult([Keypoint(0.5, 0.5)] + [None] * 17, 1.0, 1)
    fake = FakeOpenpose([PoseResult(body, hand, None, None), PoseResult(lonely, None, None, None)])
    detector = OpenPoseDetector(fake, detect_resolution=256, hands=True)
    poses = detector.detect(Image.new('RGB', (600, 900)))
    assert fake.seen == ((384, 256, 3), True, False)  # resized as ControlNet does: shorter side 256, multiples of 64
    assert len(poses) == 1  # the one-joint body is not usable
    assert (poses[0].width, poses[0].height) == (600, 900)
    np.testing.assert_allclose(poses[0].keypoints, tall.keypoints, atol=1e-6)
    assert poses[0].hands[0, :20, 2].all() and poses[0].hands[0, 20, 2] == 0 and not poses[0].hands[1, :, 2].any()


def test_openpose_weights_missing_say_which_files_and_where_to_get_them(tmp_path):
    (tmp_path / 'body_pose_model.pth').write_bytes(b'')
    with pytest.raises(PoseError, match=r'missing OpenPose weights hand_pose_model.pth, facenet.pth .*huggingface-cli download lllyasviel/Annotators'):
        OpenPoseDetector.load(tmp_path)
    with pytest.raises(PoseError, match='no such annotator directory'):
        OpenPoseDetector.load(tmp_path / 'nowhere')


def test_openpose_weights_that_are_not_openpose_are_refused(tmp_path):
    import torch
    for name in ('body_pose_model.pth', 'hand_pose_model.pth', 'facenet.pth'):
        torch.save({'not': torch.zeros(1)}, tmp_path / name)
    with pytest.raises(PoseError, match='could not load OpenPose weights'):
        OpenPoseDetector.load(tmp_path)


def test_real_openpose_network_finding_nobody_is_an_error(blind_openpose):
    detector = OpenPoseDetector(blind_openpose, detect_resolution=128)
    picture = Image.new('RGB', (200, 300), (240, 220, 200))
    assert detector.detect(picture) == []
    with pytest.raises(PoseError, match='found no person'): detect_pose(picture, detector)


# ---------------------------------------------------------------- command line

def test_cli_draw(tmp_path, openpose_native, capsys):
    source = write(tmp_path, 'keypoints.json', openpose_native)
    out = tmp_path / 'out' / 'skeleton.png'
    assert main(['pose', 'draw', str(source), '--canvas', f'{W}x{H}', '--out', str(out)]) == 0
    expected = Pose.from_openpose(source, canvas=(W, H)).skeleton_image()
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert main(['pose', 'draw', str(source), '--canvas', f'{W}x{H}', '--size', '320x320', '--all', '--out', str(out),
                 '--overwrite']) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(draw_skeletons(read_poses(source, (W, H)), 320, 320)))
    assert 'skeleton of 3 people' in capsys.readouterr().out


def test_cli_draw_options(tmp_path, comfyui_frames):
    source = write(tmp_path, 'comfy.json', comfyui_frames)
    out = tmp_path / 'skeleton.png'
    assert main(['pose', 'draw', str(source), '--person', '0', '--hands', '--face', '--frame', '0', '--out', str(out)]) == 0
    expected = Pose.from_openpose(source, person=0).skeleton_image(hands=True, face=True)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert main(['pose', 'draw', str(source), '--min-confidence', '1.0', '--out', str(out), '--overwrite']) == 0


@pytest.mark.parametrize('args, message', [
    (['--out', '{tmp}/skeleton.png'], 'no canvas size'),
    (['--canvas', '8x8', '--out', '{tmp}/skeleton.png'], 'absurd coordinates'),
    (['--canvas', '640x480', '--person', '7', '--out', '{tmp}/skeleton.png'], 'person 7 requested'),
    (['--canvas', '640x480', '--out', '{tmp}/skeleton.xyz'], "unknown image extension '.xyz'"),
])
def test_cli_draw_errors_are_one_line_and_write_nothing(tmp_path, openpose_native, capsys, args, message):
    source = write(tmp_path, 'keypoints.json', openpose_native)
    assert main(['pose', 'draw', str(source), *[a.format(tmp=tmp_path) for a in args]]) == 1
    error = capsys.readouterr().err.strip()
    assert message in error and error.startswith('anime-pose pose: error:') and '\n' not in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ['keypoints.json']


def test_cli_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit: main(['pose', 'draw', 'x.json', '--size', '12x', '--out', str(tmp_path / 'a.png')])
    assert exit.value.code == 2 and 'expected WIDTHxHEIGHT' in capsys.readouterr().err
    assert main(['pose']) == 2


def test_cli_convert(tmp_path, openpose_native):
    source = write(tmp_path, 'keypoints.json', openpose_native)
    assert main(['pose', 'convert', str(source), str(tmp_path / 'all.json'), '--canvas', f'{W}x{H}']) == 0
    data = json.loads((tmp_path / 'all.json').read_text())
    assert len(data['people']) == 3 and (data['canvas_width'], data['canvas_height']) == (W, H)
    assert main(['pose', 'convert', str(source), str(tmp_path / 'one.json'), '--canvas', f'{W}x{H}', '--person', '1']) == 0
    np.testing.assert_array_equal(Pose.from_openpose(tmp_path / 'one.json').keypoints[:, :2],
                                  Pose.from_openpose(source, canvas=(W, H), person=1).keypoints[:, :2])
    assert main(['pose', 'convert', str(tmp_path / 'missing.json'), str(tmp_path / 'never.json')]) == 1
    assert not (tmp_path / 'never.json').exists()


def test_cli_retarget(tmp_path, comfyui_frames):
    pose, like = tall_pose().save(tmp_path / 'tall.json'), chibi_pose().save(tmp_path / 'chibi.json')
    assert main(['pose', 'retarget', str(pose), '--like', str(like), '--out', str(tmp_path / 'out.json')]) == 0
    np.testing.assert_allclose(Pose.from_openpose(tmp_path / 'out.json').keypoints, retarget(tall_pose(), chibi_pose()).keypoints, atol=1e-6)
    frames = write(tmp_path, 'frames.json', comfyui_frames)
    assert main(['pose', 'retarget', str(frames), '--frame', '1', '--like', str(like), '--out', str(tmp_path / 'second.json')]) == 0
    expected = retarget(Pose.from_openpose(comfyui_frames, frame=1), chibi_pose())
    np.testing.assert_allclose(Pose.from_openpose(tmp_path / 'second.json').keypoints, expected.keypoints, atol=1e-6)
    write(tmp_path, 'animals.json', '{"animals": [[1, 2, 1]]}')
    assert main(['pose', 'retarget', str(pose), '--like', str(tmp_path / 'animals.json'), '--out', str(tmp_path / 'bad.json')]) == 1
    assert not (tmp_path / 'bad.json').exists()


def test_cli_detect_missing_weights_and_nobody_found_write_nothing(tmp_path, blind_openpose, monkeypatch, capsys):
    picture = tmp_path / 'illustration.png'
    Image.new('RGB', (200, 300), (240, 220, 200)).save(picture)
    out = tmp_path / 'pose.json'
    assert main(['pose', 'detect', str(picture), '--detector', str(tmp_path), '--out', str(out)]) == 1
    assert 'missing OpenPose weights body_pose_model.pth' in capsys.readouterr().err
    monkeypatch.setattr(OpenPoseDetector, 'load', classmethod(lambda cls, annotator, **kwargs: cls(blind_openpose, **{**kwargs, 'detect_resolution': 128})))
    assert main(['pose', 'detect', str(picture), '--detector', str(tmp_path), '--out', str(out)]) == 1
    assert 'no person found in' in capsys.readouterr().err
    assert not out.exists()


def test_cli_detect_writes_what_was_found(tmp_path, monkeypatch):
    tall = tall_pose()
    monkeypatch.setattr(OpenPoseDetector, 'load', classmethod(lambda cls, annotator, **kwargs: Stub([tall, chibi_pose()])))
    picture = tmp_path / 'photo.png'
    Image.new('RGB', (512, 768)).save(picture)
    assert main(['pose', 'detect', str(picture), '--detector', 'openpose', '--out', str(tmp_path / 'pose.json')]) == 0
    assert len(read_poses(tmp_path / 'pose.json')) == 2
    np.testing.assert_array_equal(Pose.from_openpose(tmp_path / 'pose.json', person=0).keypoints[:, :2], tall.keypoints[:, :2])

"Fixtures shared by several test files."
import warnings

import pytest


@pytest.fixture(scope='session')
def blind_openpose():
    "controlnet_aux's real OpenPose body network with all-zero weights (no download): it finds nobody."
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        from controlnet_aux.open_pose import OpenposeDetector
        from controlnet_aux.open_pose.body import Body
        from controlnet_aux.open_pose.model import bodypose_model
    body = Body.__new__(Body)
    body.model = bodypose_model().eval()
    for parameter in body.model.parameters(): torch.nn.init.zeros_(parameter)
    return OpenposeDetector(body)

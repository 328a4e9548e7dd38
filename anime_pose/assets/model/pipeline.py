# Lets diffusers find the class that loads this folder:
# DiffusionPipeline.from_pretrained(folder, custom_pipeline='pipeline', trust_remote_code=True)
from anime_pose.pipeline import PoseTransferPipeline  # pip install anime_pose

"""End to end: `transfer` given a *drawing of another character* in pose B vs given the true skeleton of B.

On held-out synthetic triples of the bundled model's recipe (as `anime-pose demo` evaluates), each pose B is also
drawn on another, random character (another identity: other proportions, colours, clothes; 256 px on a synthetic
background). The bundled model then draws A six ways, and the evaluator (`metrics.score`, the bundled grading parser)
scores each output's pose against the truth, A in pose B:

- `true skeleton`: pose B as the triple gives it (what `anime-pose demo` measures);
- `true skeleton, retargeted to A found in the reference`: the same, B redrawn with A's proportions as the parser
  detector finds A in the reference image;
- `the other character's true skeleton`: the drawn character's own exact pose (its proportions and place, no detector);
- `drawing`: the drawing of the other character as --pose (found by the bundled detector, `load_detector('parser')`);
- `drawing, retargeted to A found in the reference`: the same, with A's proportions;
- `the target drawing itself`: the held-out target image (A drawn in pose B) as --pose: the detector's error alone,
  without the other character's proportions.

    python benchmarks/transfer_from_drawing.py                 # 24 triples, 20 steps, about 5 minutes on a CPU
    python benchmarks/transfer_from_drawing.py --out benchmarks/results/transfer_from_drawing.md   # the table kept in the repository
"""
import argparse, re
from pathlib import Path

import numpy as np
import torch

from anime_pose.core import load_image, tags_prompt
from anime_pose.demo import load_recipe
from anime_pose.evaluate import held_out_triples
from anime_pose.metrics import score
from anime_pose.parser import load_detector, load_parser
from anime_pose.pipeline import load_pipeline, reference_pose_from_image
from anime_pose.pose import Pose, pck
from anime_pose.synthetic import BACKGROUNDS, PART_LABELS, character_renderings, random_identity, render_character
from anime_pose.train import TrainConfig, override_config

DATASET_SEED, POSES_PER_CHARACTER = 0, 4  # how `training_triples` draws the synthetic data (train.py)
OTHER_SEED = 4242  # the other characters' identities


def pose_spec(triple: dict):
    "The `PoseSpec` of the triple's target (pose B), found again from the dataset's seed."
    index = int(re.search(r'_(\d+)$', triple['character']).group(1))
    size = load_image(triple['target']).size[0]
    _, specs, drawings = character_renderings(DATASET_SEED, index, POSES_PER_CHARACTER, size)
    truth = np.asarray(triple['pose'], np.float32)
    j = min(range(len(specs)), key=lambda k: np.abs(drawings[k].keypoints - truth).sum())
    assert specs[j].name == triple['pose_name'] and np.abs(drawings[j].keypoints - truth).max() < 1e-4
    return specs[j]


def other_drawing(triple: dict, i: int, size: int = 256):
    "Another character drawn in pose B, and its own true pose."
    rng = np.random.default_rng([OTHER_SEED, i])
    rendering = render_character(random_identity(rng), pose_spec(triple), size, BACKGROUNDS[i % len(BACKGROUNDS)])
    return rendering.image, Pose(rendering.keypoints, size, size)


def main(count: int = 24, steps: int = 20, out: str | None = None):
    torch.set_num_threads(1)
    recipe = load_recipe()
    config = override_config(TrainConfig(), recipe['anime_pose']['config'], 'recipe anime_pose')
    triples = list(held_out_triples(config, count))
    pipe = load_pipeline(None, None, 'cpu')
    pipe.set_progress_bar_config(disable=True)
    detector, grader = load_detector('parser'), load_parser()
    drawings = [other_drawing(t, i) for i, t in enumerate(triples)]
    detected = [detector.detect(d) for d, _ in drawings]
    own = [pck(found[0], truth, 0.1) if found else 0.0 for found, (_, truth) in zip(detected, drawings)]
    references = [reference_pose_from_image(t['reference'], detector) for t in triples]

    def draw(triple, pose, reference_pose):
        size = load_image(triple['target']).size
        return pipe(triple['reference'], pose, prompt=tags_prompt(triple['tags']), num_inference_steps=steps,
                    width=size[0], height=size[1], reference_pose=reference_pose, detector=detector,
                    generator=torch.Generator().manual_seed(0)).images[0]

    def truth(t): return Pose(np.asarray(t['pose'], np.float32), *load_image(t['target']).size)
    conditions = {
        'true skeleton of B': lambda i, t: draw(t, truth(t), None),
        'true skeleton, retargeted to A found in the reference': lambda i, t: draw(t, truth(t), references[i]),
        "the other character's true skeleton (no detector)": lambda i, t: draw(t, drawings[i][1], None),
        'drawing of another character in pose B': lambda i, t: draw(t, drawings[i][0], None),
        'drawing, retargeted to A found in the reference': lambda i, t: draw(t, drawings[i][0], references[i]),
        'the target drawing itself (A in pose B, 64 px)': lambda i, t: draw(t, load_image(t['target']), None),
    }
    lines = [f'{len(triples)} held-out triples of the bundled model, {steps} steps, seed 0; the output scored by `metrics.score` '
             '(bundled grading parser) against A in pose B', '',
             f'- detector on the drawings (256 px, another character): PCK@0.1 {np.mean(own):.3f} against that character\'s own pose; '
             f'nobody found in {sum(not d for d in detected)} of {len(triples)}',
             f'- A found in the reference (64 px) for {sum(r is not None for r in references)} of {len(triples)} triples',
             f"- the other character's true pose against A's true pose B (no model): PCK@0.1 "
             f"{np.mean([pck(Pose(other.keypoints, truth(t).width, truth(t).height), truth(t), 0.1) for (_, other), t in zip(drawings, triples)]):.3f}", '',
             '| pose B given as | PCK@0.1 | OKS | silhouette IoU |', '|---|---|---|---|']
    for name, make in conditions.items():
        images = [make(i, t) for i, t in enumerate(triples)]
        rows = score(images, triples, grader, PART_LABELS)
        lines.append(f"| {name} | {np.mean([r['pck'] for r in rows]):.3f} | {np.mean([r['oks'] for r in rows]):.3f} | "
                     f"{np.mean([r['silhouette_iou'] for r in rows]):.3f} |")
        print(lines[-1], flush=True)
    text = '\n'.join(lines)
    print(text)
    if out: Path(out).write_text(text + '\n')


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--count', type=int, default=24, help='held-out triples (default 24)')
    parser.add_argument('--steps', type=int, default=20, help='denoising steps (default 20, as the demo)')
    parser.add_argument('--out', help='also write the table to this file')
    args = parser.parse_args()
    main(args.count, args.steps, args.out)

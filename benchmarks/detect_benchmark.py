"""Detection benchmark (`python benchmarks/detect_benchmark.py`): PCK@0.1 and OKS per detector on held-out renders as drawn and under each style shift,
false positives on images with no character, and time per 512 px image on one CPU thread. Prints one markdown table."""
from __future__ import annotations
import argparse, math, statistics, time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from anime_pose.core import bundled_path
from anime_pose.parser import (ParserDetector, RobustParserDetector, character_layer, character_pool, cluttered_background, colour_shift,
                               flat_background, gradient_background, ink_outline, jpeg, load_parser, noise_background, paste, thicken_lines)
from anime_pose.pose import MediaPipeDetector, Pose, PoseError, detect_pose, oks, pck
from anime_pose.synthetic import BACKGROUNDS as RENDER_BACKGROUNDS

SEED = 17017  # held-out characters: never used by any parser's training (2024) or validation
SIZE = 512  # side of the benchmark images

# held-out scenes

def scene(pool, index, rng, width=SIZE, height=SIZE, background=None, fill=0.9, at=None, style=None, second=None):
    "Character `index` of `pool` `fill` x `height` tall on `background`: the image and its true `Pose`."
    canvas = background or Image.new('RGB', (width, height), RENDER_BACKGROUNDS[index % len(RENDER_BACKGROUNDS)])
    layer, part, keypoints = character_layer(pool, index, fill * height)
    if style: layer = style(layer, part)
    x, y = at or ((width - layer.width) // 2, height - layer.height - int(0.02 * height))
    if second is not None:
        other, other_part, _ = character_layer(pool, second, 0.6 * layer.height, mirror=True)
        paste(canvas, None, other, other_part, (min(x + layer.width - other.width // 3, width - other.width), y + layer.height - other.height))
    paste(canvas, None, layer, part, (x, y))
    seen = keypoints[:, 2] > 0
    keypoints[seen, 0], keypoints[seen, 1] = (keypoints[seen, 0] + x) / width, (keypoints[seen, 1] + y) / height
    return canvas, Pose(keypoints, width, height)

def _random_at(rng, width, height, layer_height, aspect=0.6):
    return int(rng.integers(0, max(1, width - int(aspect * layer_height)))), int(rng.integers(0, max(1, height - layer_height)))

SHIFTS = {  # name -> (pool key, function of (pool, index, rng) -> (image, truth))
    'as drawn': ('main', lambda p, i, r: scene(p, i, r)),
    'size 16:9, 720x405': ('main', lambda p, i, r: scene(p, i, r, 720, 405, fill=0.9, at=(int(r.integers(0, 480)), 20))),
    'background flat': ('main', lambda p, i, r: scene(p, i, r, background=flat_background(r, SIZE, SIZE))),
    'background gradient': ('main', lambda p, i, r: scene(p, i, r, background=gradient_background(r, SIZE, SIZE))),
    'background cluttered': ('main', lambda p, i, r: scene(p, i, r, background=cluttered_background(r, SIZE, SIZE))),
    'line weight (4 px ink)': ('main', lambda p, i, r: scene(p, i, r, style=lambda layer, part: ink_outline(layer, part, 4))),
    'line weight (thick, min filter)': ('main', lambda p, i, r: scene(p, i, r, style=lambda layer, part: thicken_lines(layer, 3))),
    'colour shift': ('main', lambda p, i, r: (lambda im, t: (colour_shift(im, r.uniform(0.2, 0.8), r.uniform(0.4, 1.3), r.uniform(0.6, 1.0)), t))(*scene(p, i, r))),
    'JPEG q30': ('main', lambda p, i, r: (lambda im, t: (jpeg(im, 30), t))(*scene(p, i, r))),
    'small in frame (25%)': ('main', lambda p, i, r: scene(p, i, r, fill=0.25, at=_random_at(r, SIZE, SIZE, 0.25 * SIZE))),
    'large in frame (100%)': ('main', lambda p, i, r: scene(p, i, r, fill=1.0, at=None)),
    'two characters': ('main', lambda p, i, r: scene(p, i, r, fill=0.8, at=(40, 80), second=(i + 1) % len(p['rgba']))),
    'chibi (2.4 heads)': ('chibi', lambda p, i, r: scene(p, i, r)),
    'tall (6.5 heads)': ('tall', lambda p, i, r: scene(p, i, r)),
}

# images with no character

WORDS = 'the quick brown fox jumps over a lazy dog pose anime sketch draw 2026 hello world mountain river'.split()

def text_image(rng, size=SIZE) -> Image.Image:
    "Lines of random words in random sizes and colours on a flat colour."
    image = flat_background(rng, size, size)
    draw = ImageDraw.Draw(image)
    y = int(rng.integers(0, 40))
    while y < size:
        height = int(rng.integers(14, 70))
        draw.text((int(rng.integers(-20, 60)), y), ' '.join(rng.choice(WORDS, 6)), fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                  font=ImageFont.load_default(height))
        y += int(height * rng.uniform(1.1, 1.8))
    return image

def landscape_image(rng, size=SIZE) -> Image.Image:
    "A sky, a sun, layered mountains, a ground and trees, drawn with polygons."
    image = gradient_background(rng, size, size)
    draw = ImageDraw.Draw(image)
    sun = rng.uniform(0.1, 0.9, 2) * (size, size * 0.4)
    r = rng.uniform(15, 50)
    draw.ellipse([*(sun - r), *(sun + r)], fill=(255, int(rng.integers(180, 256)), int(rng.integers(60, 200))))
    for layer in range(int(rng.integers(2, 5))):
        base = size * (0.45 + 0.1 * layer)
        xs = np.linspace(-20, size + 20, int(rng.integers(4, 10)))
        ridge = [(float(x), float(base - rng.uniform(20, 160))) for x in xs]
        draw.polygon(ridge + [(size + 20, size), (-20, size)], fill=tuple(int(v) for v in rng.integers(20, 160, 3)))
    for _ in range(int(rng.integers(0, 12))):
        x, y, h = rng.uniform(0, size), rng.uniform(0.6, 1.0) * size, rng.uniform(20, 90)
        draw.rectangle([x - 3, y - h * 0.3, x + 3, y], fill=(90, 60, 30))
        draw.polygon([(x, y - h), (x - h / 4, y - h * 0.3), (x + h / 4, y - h * 0.3)], fill=(30, int(rng.integers(90, 160)), 40))
    return image

def empty_images(rng, each: int = 25) -> dict[str, list[Image.Image]]:
    "`each` images of noise, gradients, text and landscapes, with nobody in them."
    return {'noise': [noise_background(rng, SIZE, SIZE) for _ in range(each)],
            'gradient': [gradient_background(rng, SIZE, SIZE) for _ in range(each)],
            'text': [text_image(rng) for _ in range(each)], 'landscape': [landscape_image(rng) for _ in range(each)]}

# measuring

def score(detector, image, truth: Pose) -> tuple[float, float]:
    "PCK@0.1 and OKS of the largest person found (0, 0 when nobody is)."
    try: found = detect_pose(image, detector)
    except PoseError: return 0.0, 0.0
    return pck(found, truth, 0.1), oks(found, truth)

def median_time(detector, images) -> tuple[float, float]:
    "Median wall and CPU seconds (every thread of this process) per image."
    wall, cpu = [], []
    for image in images:
        started, used = time.perf_counter(), time.process_time()
        detector.detect(image)
        wall.append(time.perf_counter() - started); cpu.append(time.process_time() - used)
    return statistics.median(wall), statistics.median(cpu)

def detectors(robust_path: str) -> dict:
    "The detectors compared: the bundled parser, the robust parser (two stages and one), mediapipe."
    robust = load_parser(robust_path or bundled_path('detector'))
    found = {'ParserDetector (assets/parser, the grader)': ParserDetector(load_parser()),
             'parser: RobustParserDetector (assets/detector, 2 stages)': RobustParserDetector(robust),
             'the same, 1 stage': RobustParserDetector(robust, refine=False)}
    try: found['mediapipe 0.10.14 (BlazePose full)'] = MediaPipeDetector()
    except PoseError as e: print(e)
    return found

def benchmark(robust_path: str | None = None, images: int = 60, seed: int = SEED) -> str:
    "The markdown table: one column per detector."
    torch.set_num_threads(1)
    pools = {'main': character_pool(images, 1, seed, SIZE, tall_share=0), 'chibi': character_pool(images, 1, seed + 1, SIZE, heads_tall=2.4),
             'tall': character_pool(images, 1, seed + 2, SIZE, heads_tall=6.5)}
    sets = {}
    for name, (key, make) in SHIFTS.items():
        rng = np.random.default_rng([seed, len(sets)])
        sets[name] = [make(pools[key], i, rng) for i in range(images)]
    empty = empty_images(np.random.default_rng([seed, 99]))
    found = detectors(robust_path)
    rows = {}
    for detector_name, detector in found.items():
        for name, pairs in sets.items():
            scores = np.array([score(detector, image, truth) for image, truth in pairs])
            rows.setdefault(f'PCK@0.1 / OKS: {name}', {})[detector_name] = f'{scores[:, 0].mean():.3f} / {scores[:, 1].mean():.3f}'
        nobody = {name: [not detector.detect(p) for p in pictures] for name, pictures in empty.items()}
        for name, answers in nobody.items():
            rows.setdefault(f'no person reported: {name} ({len(answers)})', {})[detector_name] = f'{np.mean(answers):.2f}'
        answers = [a for values in nobody.values() for a in values]
        rows.setdefault(f'no person reported: all {len(answers)} empty images', {})[detector_name] = f'{np.mean(answers):.3f}'
        for name in ('as drawn', 'small in frame (25%)'):
            wall, cpu = median_time(detector, [im for im, _ in sets[name][:30]])
            rows.setdefault(f'median s per 512 px image (wall / CPU), 1 thread: {name}', {})[detector_name] = f'{wall:.4f} / {cpu:.4f}'
        print(f'measured {detector_name}', flush=True)
    names = list(found)
    lines = ['| measure | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
    lines += [f'| {row} | ' + ' | '.join(values.get(n, '') for n in names) + ' |' for row, values in rows.items()]
    return '\n'.join(lines)

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--robust', default=None, help='the robust parser directory (default: the bundled assets/detector)')
    parser.add_argument('--images', type=int, default=60, help='held-out images per condition')
    args = parser.parse_args()
    print(benchmark(args.robust, args.images))

"""`anime-pose data filter` against a plain `json`-module loop applying the same rules, both timed through the command
line (whole processes: start-up and imports included), on generated Danbooru metadata in the real formats.

    python benchmarks/danbooru_filter.py                     # 300,000 posts, 5 interleaved pairs of runs
    python benchmarks/danbooru_filter.py --posts 20000 --runs 3   # a quick run

The plain loop is what a user would write: `json.loads` on each line, the rules of the default `FilterSpec` read
straight off the decoded record (both formats: legacy tag objects or API tag strings, numbers as numbers or strings),
the kept records written out as JSON lines, malformed lines skipped. No `Post` objects. Both sides run in turn
(plain, CLI, plain, CLI, ...), so a change in the machine's load hits both; the ratio is taken pair by pair and the
medians are quoted. Both must keep the same posts (checked). The machine's load average is printed (`uptime`).
"""
from __future__ import annotations
import argparse, json, os, resource, shutil, statistics, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ---- the plain loop (run as its own process: `python danbooru_filter.py --plain OUT FILE...`) ----

RATINGS, FILE_EXTS = {'s', 'g'}, {'jpg', 'jpeg', 'png', 'webp'}  # the default FilterSpec, written out
REQUIRED, EXCLUDED = {'solo', 'full_body'}, {'comic', '4koma', 'monochrome', 'greyscale', 'multiple_views', 'text_focus',
                                             'lowres', 'chibi'}
MIN_SIDE, ASPECT, MIN_SCORE = 512, (0.4, 1.6), 1


def plain_keep(r: dict) -> bool:
    "The default spec's rules on one decoded record of either format."
    if r.get('is_deleted') in (True, 'true') or r.get('is_banned') in (True, 'true'): return False
    if r['rating'] not in RATINGS or r['file_ext'].lower() not in FILE_EXTS: return False
    width, height = int(r['image_width']), int(r['image_height'])
    if min(width, height) < MIN_SIDE or not ASPECT[0] <= width / height <= ASPECT[1]: return False
    if int(r.get('score') or 0) < MIN_SCORE: return False
    if r.get('tags') is not None:
        tags = {t['name'] for t in r['tags']}
        characters = sum(str(t['category']) == '4' for t in r['tags'])
    else:
        tags = set(' '.join(r.get(f'tag_string_{c}') or '' for c in ('general', 'character', 'copyright', 'artist', 'meta')).split())
        characters = len((r.get('tag_string_character') or '').split())
    return characters == 1 and REQUIRED <= tags and EXCLUDED.isdisjoint(tags)


def plain(out: str, files: list[str]) -> None:
    "The plain loop: decode, apply the rules, write the kept records; print how many were kept."
    kept = 0
    with open(out, 'w') as f:
        for path in files:
            with open(path, 'rb') as lines:
                for line in lines:
                    try:
                        record = json.loads(line)
                        if record.get('id') is None or not plain_keep(record): continue
                    except (ValueError, KeyError, TypeError, AttributeError): continue  # malformed: skipped
                    f.write(json.dumps(record) + '\n')
                    kept += 1
    print(kept)


# ---- the comparison ----

def uptime() -> str:
    try: return subprocess.run(['uptime'], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError): return 'load average: ' + ', '.join(f'{x:.2f}' for x in os.getloadavg())


def timed_run(command: list[str]) -> tuple[float, float, str]:
    "(wall s, CPU s of the process and its children, stdout) of one run."
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done.stdout


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--posts', type=int, default=300_000, help='posts to generate (default 300,000)')
    parser.add_argument('--files', type=int, default=4, help='metadata files, alternating legacy / posts*.json (BigQuery) format')
    parser.add_argument('--workers', type=int, default=2, help='--workers of anime-pose data filter (default 2)')
    parser.add_argument('--runs', type=int, default=5, help='pairs of runs (default 5)')
    parser.add_argument('--results', default=str(HERE / 'results' / 'danbooru_filter.txt'), help='where to write the printed lines')
    parser.add_argument('--plain', nargs='+', metavar=('OUT', 'FILE'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain: return plain(args.plain[0], args.plain[1:])

    from anime_pose.danbooru import fake_metadata
    folder = HERE / 'data' / 'danbooru_filter'
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    lines = []
    def say(text=''):
        print(text, flush=True)
        lines.append(text)
    try:
        per_file, files = -(-args.posts // args.files), []
        for i in range(args.files):
            path = folder / f"{'legacy' if i % 2 == 0 else 'bigquery'}_{i:02d}.jsonl"
            fake_metadata(path, min(per_file, args.posts - i * per_file), 'legacy' if i % 2 == 0 else 'bigquery', seed=i,
                          first_id=1 + i * per_file)
            files.append(str(path))
        size = sum(Path(p).stat().st_size for p in files)
        anime_pose = shutil.which('anime-pose') or 'anime-pose'
        cli = [anime_pose, 'data', 'filter', '--metadata', *files, '--out', str(folder / 'out'), '--overwrite',
               '--workers', str(args.workers)]
        loop = [sys.executable, __file__, '--plain', str(folder / 'plain.jsonl'), *files]
        say(f'# danbooru_filter: {args.posts:,} generated posts ({size / 1e6:.0f} MB, half legacy, half BigQuery rows), '
            f'{args.runs} interleaved pairs, {os.cpu_count()} cores, python {sys.version.split()[0]}')
        say(f'plain: python benchmarks/danbooru_filter.py --plain OUT FILE...   (json module, 1 process)')
        say(f'cli:   anime-pose data filter --metadata FILE... --out OUT --overwrite --workers {args.workers}')
        say(f'uptime before: {uptime()}')
        import anime_pose  # its .pyc files, as an installed package has them (even where PYTHONDONTWRITEBYTECODE is set)
        subprocess.run([sys.executable, '-m', 'compileall', '-q', str(Path(anime_pose.__file__).parent)], check=True)
        timed_run(cli), timed_run(loop)  # warm-up: page cache, .pyc files
        plain_wall, plain_cpu, cli_wall, cli_cpu, ratios = [], [], [], [], []
        for run in range(args.runs):
            wall, cpu, out = timed_run(loop)
            plain_wall.append(wall), plain_cpu.append(cpu)
            plain_kept = int(out.split()[-1])
            wall, cpu, _ = timed_run(cli)
            cli_wall.append(wall), cli_cpu.append(cpu)
            cli_kept = json.loads((folder / 'out' / 'report.json').read_text())['kept']
            assert plain_kept == cli_kept, f'the plain loop kept {plain_kept} posts, the CLI {cli_kept}'
            if run == 0:  # the same posts, not only as many
                plain_ids = [int(json.loads(line)['id']) for line in open(folder / 'plain.jsonl')]
                cli_ids = [json.loads(line)['id'] for line in open(folder / 'out' / 'posts.jsonl')]
                assert plain_ids == cli_ids, 'the plain loop and the CLI kept different posts'
                report = json.loads((folder / 'out' / 'report.json').read_text())
                say(f"same kept posts, in the same order ({len(cli_ids):,} ids compared); the CLI reported "
                    f"{report['malformed']:,} malformed lines ({dict(report['malformed_reasons'])}) in malformed.tsv")
            ratios.append(plain_wall[-1] / cli_wall[-1])
            say(f'pair {run + 1}: plain {plain_wall[-1]:.2f} s wall ({plain_cpu[-1]:.2f} CPU s), '
                f'cli {cli_wall[-1]:.2f} s wall ({cli_cpu[-1]:.2f} CPU s), plain/cli {ratios[-1]:.2f}x; both kept {cli_kept:,}')
        say(f'uptime after: {uptime()}')
        median = statistics.median
        say(f'median wall: plain {median(plain_wall):.2f} s, cli {median(cli_wall):.2f} s; '
            f'median CPU: plain {median(plain_cpu):.2f} s, cli {median(cli_cpu):.2f} s')
        say(f'median ratio of pairs (plain / cli, wall): {median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}); '
            f'CPU: {median(p / c for p, c in zip(plain_cpu, cli_cpu)):.2f}x')
        say(f'cli throughput: {args.posts / median(cli_wall):,.0f} posts/s; 4,900,000 posts at that rate: '
            f'{4_900_000 / args.posts * median(cli_wall):.1f} s')
    finally: shutil.rmtree(folder, ignore_errors=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()

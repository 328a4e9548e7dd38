"""How long `synthetic_dataset` takes to build 10,000 triples at 64 px (the goal: 60 s on 2 cores).

    python benchmarks/synthetic_speed.py [--characters 2500] [--poses-per-character 4] [--size 64] [--num-proc 2]

Prints the wall time, the rate, the machine's load average before and after (other work on the
machine slows the wall time down), and the CPU time this process and its workers spent, which
does not depend on that load: CPU time / processes is the wall time on idle cores."""
import argparse, os, resource, time

from anime_pose.synthetic import synthetic_dataset


def cpu_seconds() -> tuple[float, float]:
    "User + system CPU time of this process, and of its finished children (the workers)."
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--characters', type=int, default=2500)
    parser.add_argument('--poses-per-character', type=int, default=4)
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-proc', type=int, default=os.cpu_count())
    args = parser.parse_args()
    load_before = os.getloadavg()
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    dataset = synthetic_dataset(args.characters, args.poses_per_character, args.size, args.seed, args.num_proc, progress=False)
    seconds = time.perf_counter() - start
    triples = sum(split.num_rows for split in dataset.values())
    load_after = os.getloadavg()
    (main_after, workers_after), (main_before, workers_before) = cpu_seconds(), cpu_before
    main_cpu, workers = main_after - main_before, workers_after - workers_before
    print(f'{triples} triples at {args.size} px in {seconds:.1f} s on {args.num_proc} processes '
          f'({triples / seconds:.0f} triples/s; {os.cpu_count()} cores)')
    print(f'load average (1, 5, 15 min) before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, '
          f'after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}')
    idle = main_cpu + workers / args.num_proc  # an upper bound: the main process also works while the workers draw
    print(f'CPU time {main_cpu + workers:.1f} s (main process {main_cpu:.1f} s, workers {workers:.1f} s; '
          f'{1000 * (main_cpu + workers) / triples:.2f} CPU ms per triple): at most {idle:.1f} s of wall time on {args.num_proc} idle cores')


if __name__ == '__main__':
    main()

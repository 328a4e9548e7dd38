"""How long `synthetic_dataset` takes to build 10,000 triples at 64 px (the goal: 60 s on 2 cores).

    python benchmarks/synthetic_speed.py [--characters 2500] [--poses-per-character 4] [--size 64] [--num-proc 2]

Prints the time, the rate, and the machine's load average before and after, since other work on
the machine slows the figure down."""
import argparse, os, time

from anime_pose.synthetic import synthetic_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--characters', type=int, default=2500)
    parser.add_argument('--poses-per-character', type=int, default=4)
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--num-proc', type=int, default=os.cpu_count())
    args = parser.parse_args()
    load_before = os.getloadavg()
    start = time.perf_counter()
    dataset = synthetic_dataset(args.characters, args.poses_per_character, args.size, args.seed, args.num_proc, progress=False)
    seconds = time.perf_counter() - start
    triples = sum(split.num_rows for split in dataset.values())
    load_after = os.getloadavg()
    print(f'{triples} triples at {args.size} px in {seconds:.1f} s on {args.num_proc} processes '
          f'({triples / seconds:.0f} triples/s; {os.cpu_count()} cores)')
    print(f'load average (1, 5, 15 min) before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, '
          f'after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}')


if __name__ == '__main__':
    main()

"""Prepare training and evaluation data.

    python -m launch.prepare_data synthetic --out data/synthetic --seed 0 --entities 400
    python -m launch.prepare_data check FILE [FILE ...]      # validate QA files and print a summary

``synthetic`` writes the synthetic search world (see ``launch/synthetic_world.py``): ``corpus.jsonl`` and
``{train,val,test}.parquet`` in the ZeroSearch / Search-R1 schema. ``check`` loads any supported QA file (ZeroSearch
parquet, FlashRAG jsonl, synthetic parquet) with the same loader training uses, so a broken row is found before a run.
"""

from __future__ import annotations

import argparse
import collections
import sys

from actors.dataset import DatasetError, load_qa

DEFAULT_ENTITIES = 400


def _synthetic(args: argparse.Namespace) -> int:
    from launch.synthetic_world import write_world

    paths = write_world(args.out, seed=args.seed, entities=args.entities)
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    for path in args.files:
        try:
            examples = load_qa(path)
        except DatasetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        sources = collections.Counter(e.data_source for e in examples)
        print(f"{path}\t{len(examples)} rows\t" + ", ".join(f"{k}={v}" for k, v in sorted(sources.items())))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    synthetic = commands.add_parser("synthetic", help="write the synthetic search world")
    synthetic.add_argument("--out", required=True, help="output folder")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--entities", type=int, default=DEFAULT_ENTITIES, help="number of people in the world")
    synthetic.set_defaults(run=_synthetic)
    check = commands.add_parser("check", help="validate QA files")
    check.add_argument("files", nargs="+")
    check.set_defaults(run=_check)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

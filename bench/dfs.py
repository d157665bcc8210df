"""Deep Feature Surgery: training time per epoch and exit accuracy, with vs without, in one run.

For the EENets ResNet (examples/digits) and MSDNet (examples/msdnet) examples: the two
training variants (train.feature_surgery off / beta) are timed epoch by epoch, alternating
plain and surgery epochs so both see the same machine state, and each variant is then
trained to the end from the same seed and scored per exit on the test split. Prints the
surgery/plain ratio of the median epoch time (DFS claims up to 50% less training time from
a cheaper backward) and the accuracy change per exit.

    python bench/dfs.py [--beta 0.5] [--rounds 5] [--models digits,msdnet]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import _paths  # noqa: F401 - first: keeps bench/ off the import path
import torch

from edgeexit.build import new_model
from edgeexit.data import load_dataset, normalize
from edgeexit.spec import load_spec
from edgeexit.train import exit_accuracy, train

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def with_train(spec, **changes):
    """`spec` with some train fields replaced."""
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, **changes))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--beta", type=float, default=0.5, help="share of exit-specific channels")
    p.add_argument("--rounds", type=int, default=5, help="timed epochs per variant")
    p.add_argument("--models", default="digits,msdnet", help="example folders to compare")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Deep Feature Surgery, beta {args.beta}, {args.threads} threads; epoch times interleaved in this run")
    print(f"{'model':<16} {'plain s/epoch':>13} {'DFS s/epoch':>11} {'DFS/plain':>9}   test accuracy per exit (plain -> DFS)")
    for name in args.models.split(","):
        spec = load_spec(EXAMPLES / name / "model.yaml")
        data = load_dataset(spec)
        variants = {"plain": with_train(spec, feature_surgery=None), "dfs": with_train(spec, feature_surgery=args.beta)}
        costs = [1.0] * 8  # the ce loss ignores costs
        timing = {key: [] for key in variants}
        models = {key: new_model(v) for key, v in variants.items()}
        for _ in range(args.rounds):
            for key, v in variants.items():
                timing[key] += train(models[key], with_train(v, epochs=1), data, costs, progress=False).epoch_seconds
        plain, dfs = statistics.median(timing["plain"]), statistics.median(timing["dfs"])
        x_test = normalize(data.test.x, spec.input.mean, spec.input.std)
        acc = {}
        for key, v in variants.items():
            model = new_model(v)
            train(model, v, data, costs, progress=False)
            acc[key] = exit_accuracy(model, x_test, data.test.y)
        per_exit = ", ".join(f"{a:.1%}->{b:.1%}" for a, b in zip(acc["plain"], acc["dfs"]))
        print(f"{spec.name:<16} {plain:>13.3f} {dfs:>11.3f} {dfs / plain:>9.3f}   {per_exit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

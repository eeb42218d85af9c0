"""FID, KID and IS by the project's formulas (fedgan/metrics.py) against torchmetrics' metrics on the same features.

Issue 23 asks to compute them through torchmetrics (the metric classifier as its feature module, the real features
computed once and kept) unless a measurement says otherwise. This times one evaluation's share of each, the real
side computed once, at the presets' sample counts, on features of the classifier's width, and prints the values'
differences. Random features: the cost depends on the shapes, not the values.

    python benchmarks/metrics_backends.py [--n 5000 10000] [--features 128] [--classes 10] [--repeat 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedgan.metrics import frechet_distance, inception_score, kernel_distance  # noqa: E402


class Passthrough(torch.nn.Module):
    """A feature module that returns its input: torchmetrics then scores the features it is given."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def best_of(repeat: int, fn):
    """(the fastest of `repeat` calls in seconds, its result)."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[5000, 10000])
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; features {args.features}, "
          f"classes {args.classes}; seconds an evaluation (best of {args.repeat}), the real side computed once")
    print(f"{'n':>6} | {'metric':6} | {'ours s':>7} | {'torchmetrics s':>14} | tm/ours | |difference|")
    for n in args.n:
        draws = torch.Generator().manual_seed(n)
        real = torch.randn(n, args.features, generator=draws)
        fake = 0.8 * torch.randn(n, args.features, generator=draws) + 0.1
        logits = 3 * torch.randn(n, args.classes, generator=draws)
        fid = FrechetInceptionDistance(feature=Passthrough(args.features), reset_real_features=False,
                                       normalize=False).double()
        fid.update(real.double(), real=True)  # once, as the Evaluator keeps its real features

        def torchmetrics_fid():
            fid.reset()  # keeps the real statistics
            fid.update(fake.double(), real=False)
            return float(fid.compute())
        kid = KernelInceptionDistance(feature=Passthrough(args.features), subsets=50, subset_size=min(1000, n),
                                      reset_real_features=False)
        kid.update(real, real=True)

        def torchmetrics_kid():
            kid.reset()
            kid.update(fake, real=False)
            return float(kid.compute()[0])
        score = InceptionScore(feature=Passthrough(args.classes), splits=10)

        def torchmetrics_is():
            score.reset()
            score.update(logits)
            return float(score.compute()[0])
        rows = [("FID", lambda: frechet_distance(fake, real), torchmetrics_fid),
                ("KID", lambda: kernel_distance(fake, real)[0], torchmetrics_kid),
                ("IS", lambda: inception_score(logits)[0], torchmetrics_is)]
        for name, ours, theirs in rows:
            ours_s, ours_value = best_of(args.repeat, ours)
            theirs_s, theirs_value = best_of(args.repeat, theirs)
            print(f"{n:>6} | {name:6} | {ours_s:7.3f} | {theirs_s:14.3f} | {theirs_s / ours_s:7.1f} | "
                  f"{abs(ours_value - theirs_value):.2e} (ours {ours_value:.6g})")


if __name__ == "__main__":
    main()

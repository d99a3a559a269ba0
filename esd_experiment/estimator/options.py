"""The estimator's options: one frozen ``ESDConfig``, its command-line flags, and their
forwarding from the runner to each worker. Imports neither torch nor numpy, so the runner can
check the flags before any worker starts.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass

from esd_experiment.core.errors import InputError
from esd_experiment.core.results import METRICS_KEY, OPTION_NAMES, options_key
from esd_experiment.estimator.metrics import (
    MP_FIT,
    load_metrics,
    metric_argv,
    pinned_spec,
    randomize_metric,
)

FIX_FINGERS = ("xmin_mid", "xmin_peak", "DKS")
PRECISION_NAMES = ("float64", "float32")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ESDConfig:
    """Every option of the estimator, with the references' defaults."""

    fix_fingers: str = "xmin_mid"   # xmin_mid | xmin_peak | DKS (metrics.md section 3)
    xmin_pos: int = 2               # xmin_mid: i = n // xmin_pos
    bins: int = 100                 # xmin_peak: histogram bins over log10(evals)
    evals_thresh: float = 1e-5      # fit set threshold when filter_zeros is on
    filter_zeros: bool = False      # TempBalance default; WeightWatcher always filters
    conv_norm: float = 0.5          # 4-D conv slices are scaled by sqrt(conv_norm)
    min_evals: int = 10             # fewer eigenvalues -> status "too_small"
    precision: str = "float64"      # float64 (exact, default) | float32 (faster, documented error)
    device: str = "cpu"             # "cpu", "cuda", "cuda:1"
    keep_evals: bool = False        # attach each layer's eigenvalues to its result
    chunk_elems: int = 1 << 19      # entries per Gram row chunk and per KS-scan block (4 MiB f64)
    metrics: tuple = ()             # custom metrics (custom_metrics.Metric; functions or specs)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", load_metrics(self.metrics))
        if self.fix_fingers not in FIX_FINGERS:
            raise InputError(f"fix_fingers={self.fix_fingers!r} is not one of {FIX_FINGERS}")
        if self.precision not in PRECISION_NAMES:
            raise InputError(f"precision={self.precision!r} is not one of {PRECISION_NAMES}")
        for name in ("xmin_pos", "bins", "chunk_elems"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.min_evals < 0 or not 0 < self.conv_norm < math.inf:
            raise InputError(f"need min_evals >= 0 and a finite conv_norm > 0, got "
                             f"{self.min_evals}, {self.conv_norm}")
        if not 0 <= self.evals_thresh < math.inf:  # negative: zeros enter the fit; NaN: nothing
            raise InputError(f"evals_thresh must be a finite number >= 0, got {self.evals_thresh}")
        if not _DEVICE.match(str(self.device)):
            raise InputError(f"device={self.device!r} is not a device such as 'cpu', 'cuda' or "
                             f"'cuda:1'")

    @property
    def options_key(self) -> str:
        """The options that change the numbers, as the ``esd_options`` column records them
        (custom metrics included)."""
        return options_key({name: getattr(self, name) for name in OPTION_NAMES},
                           [m.name for m in self.metrics])

    @property
    def options_record(self) -> dict:
        """The options as a results directory's ``.esd_options.json`` records them: those that
        change the numbers, and the custom metrics' names when there are any."""
        record: dict = {name: getattr(self, name) for name in OPTION_NAMES}
        if self.metrics:
            record[METRICS_KEY] = [m.name for m in self.metrics]
        return record

    @property
    def eigs_key(self) -> str:
        """The options eigenvalues depend on, as an ``.eigs.npz`` records them: custom
        metrics left out, so that eigenvalues saved once serve every metric."""
        return options_key({name: getattr(self, name) for name in OPTION_NAMES})


# ---------------------------------------------------------------------------------------------
# Command-line options shared by the runner and the worker; the runner forwards them.


def add_esd_arguments(parser: argparse.ArgumentParser) -> None:
    """The estimator's options, with the seed's names and the references' defaults."""
    d = ESDConfig()
    g = parser.add_argument_group("ESD estimator")
    g.add_argument("--fix_fingers", choices=FIX_FINGERS, default=d.fix_fingers,
                   help="how xmin is chosen (default: %(default)s)")
    g.add_argument("--evals_thresh", type=float, default=d.evals_thresh,
                   help="with --filter_zeros, fit only eigenvalues above this (default: %(default)g)")
    g.add_argument("--bins", type=int, default=d.bins, help="histogram bins for xmin_peak")
    g.add_argument("--xmin_pos", type=int, default=d.xmin_pos, help="xmin_mid: xmin index = n // xmin_pos")
    g.add_argument("--conv_norm", type=float, default=d.conv_norm,
                   help="conv slices are scaled by sqrt(conv_norm)")
    g.add_argument("--min_evals", type=int, default=d.min_evals,
                   help="layers with fewer eigenvalues get status too_small")
    g.add_argument("--filter_zeros", action=argparse.BooleanOptionalAction, default=d.filter_zeros,
                   help="drop eigenvalues <= --evals_thresh from the fit (WeightWatcher always does)")
    g.add_argument("--precision", choices=PRECISION_NAMES, default=d.precision,
                   help="eigenvalue arithmetic; float32 is faster, its error is in BENCHMARKS.md")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA when visible, else CPU), cpu, cuda or cuda:N")
    g.add_argument("--save_eigs", action="store_true",
                   help="also write each model's eigenvalues to <name>.eigs.npz")
    g.add_argument("--parallel_esd", action=argparse.BooleanOptionalAction, default=False,
                   help="spread one model's layers across all GPUs its job holds")
    g.add_argument("--metric", action="append", default=[], metavar="FILE.py:FUNCTION",
                   help="a custom metric, FUNCTION(evals) -> {column: number} (or "
                        "package.module:FUNCTION); repeatable. See docs/metrics.md")
    g.add_argument("--delta", action="store_true",
                   help="also write delta/<name>.csv for every model with a source_model (and "
                        "adapter): the ESD of W - W_source, layer by layer")
    g.add_argument("--mp_fit", action="store_true",
                   help="add WeightWatcher's Marchenko-Pastur fit columns (bulk_max, bulk_min, "
                        "mp_softrank, num_spikes, sigma_mp, W_scale)")
    g.add_argument("--randomize", action="store_true",
                   help="add WeightWatcher's randomized-ESD columns (the ESD of each matrix "
                        "shuffled element-wise: rand_distance, max_rand_eval, ww_softrank, ...)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of --randomize's shuffle, recorded in esd_options "
                        "(default: %(default)s)")


def esd_config_from_args(args: argparse.Namespace, device: str) -> ESDConfig:
    return ESDConfig(
        fix_fingers=args.fix_fingers, xmin_pos=args.xmin_pos, bins=args.bins,
        evals_thresh=args.evals_thresh, filter_zeros=args.filter_zeros,
        conv_norm=args.conv_norm, min_evals=args.min_evals, precision=args.precision,
        device=device, keep_evals=args.save_eigs, metrics=metrics_of(args),
    )


def metrics_of(args: argparse.Namespace) -> tuple:
    """The metrics ``--mp_fit``, ``--randomize`` and ``--metric`` ask for, in that order
    (specs unloaded)."""
    return (((MP_FIT,) if getattr(args, "mp_fit", False) else ())
            + ((randomize_metric(getattr(args, "seed", 0)),)
               if getattr(args, "randomize", False) else ())
            + tuple(getattr(args, "metric", None) or ()))


def pinned_args(args: argparse.Namespace, config: ESDConfig) -> argparse.Namespace:
    """``args`` with each ``--metric`` spec pinned to the version of its file that ``config``
    (built from ``args``) loaded: a worker given them computes with that version or fails."""
    specs = list(getattr(args, "metric", None) or ())
    loaded = config.metrics[len(config.metrics) - len(specs):]  # --metric's come last
    pinned = [pinned_spec(s, m.name) for s, m in zip(specs, loaded, strict=True)]
    return argparse.Namespace(**{**vars(args), "metric": pinned})


def esd_argv(args: argparse.Namespace) -> list[str]:
    """The estimator options of ``args`` as worker arguments (the runner's half of the contract)."""
    argv = [
        "--fix_fingers", args.fix_fingers, "--evals_thresh", repr(args.evals_thresh),
        "--bins", str(args.bins), "--xmin_pos", str(args.xmin_pos),
        "--conv_norm", repr(args.conv_norm), "--min_evals", str(args.min_evals),
        "--precision", args.precision, "--device", args.device,
        "--filter_zeros" if args.filter_zeros else "--no-filter_zeros",
        "--parallel_esd" if args.parallel_esd else "--no-parallel_esd",
    ]
    if args.save_eigs:
        argv.append("--save_eigs")
    if getattr(args, "mp_fit", False):
        argv.append("--mp_fit")
    if getattr(args, "randomize", False):
        argv += ["--randomize", "--seed", str(args.seed)]
    if getattr(args, "delta", False):
        argv.append("--delta")
    for spec in getattr(args, "metric", None) or ():
        argv += ["--metric", metric_argv(spec)]
    return argv

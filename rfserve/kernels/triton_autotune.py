"""Triton's autotuner as the served kernels use it: pruned by the compile check's rule, keyed by size buckets,
and timing nothing once the server is ready (`kernels.tuning`).

Each kernel takes its size buckets as extra integer arguments it never reads (`tuning.bucket` of its lengths),
named in `buckets`, and marks its raw lengths `do_not_specialize`: so a new length in a tuned bucket neither
re-tunes nor compiles. The tuner remembers which configuration won in each bucket; after ready, a bucket nobody
tuned gets the nearest tuned bucket's configuration as the only candidate, and a single candidate is not timed.
"""
from __future__ import annotations

from typing import Callable

import torch

from rfserve.kernels import tuning
from rfserve.kernels.limits import GpuLimits, Usage, limits_for, problems
from rfserve.kernels.triton_lang import triton


def fitting(configs: list, usage: Callable[[triton.Config], Usage | None], limits: GpuLimits) -> list:
    """The configs whose compiled kernel keeps within `limits` (`limits.problems`, the compile check's rule);
    `usage` None is a config that failed to load (out of resources). An error when none is left, naming why."""
    kept, rejected = [], []
    for config in configs:
        found = usage(config)
        reasons = ["does not load"] if found is None else problems(limits, found)
        if reasons:
            rejected.append(f"{config}: {'; '.join(reasons)}")
        else:
            kept.append(config)
    if not kept:
        raise RuntimeError(f"no configuration fits {limits.name}: {rejected}")
    return kept


class Tuner:
    """`triton.autotune` over `kernel` with `key` (argument names), of which `buckets` hold size buckets."""

    def __init__(self, kernel, configs: list, key: list[str], buckets: tuple[str, ...]):
        self.kernel, self.key, self.buckets = kernel, key, buckets
        self.tuned: dict[tuple, dict[tuple, triton.Config]] = {}      # kind -> buckets -> the winner there
        self.autotuner = triton.autotune(configs=configs, key=key, do_bench=self._time,
                                         prune_configs_by={"early_config_prune": self._prune})(kernel)

    @property
    def configs(self) -> list:
        return self.autotuner.configs

    def launch(self, grid, args: tuple, constexprs: dict) -> None:
        self.autotuner[grid](*args, **constexprs)
        if not torch.compiler.is_compiling():       # traced, the launch is a graph node and picked nothing yet
            named = dict(zip(self.kernel.arg_names, args))
            where = tuple(named[b] for b in self.buckets)
            self.tuned.setdefault(self._kind(named, constexprs), {})[where] = self.autotuner.best_config

    def _kind(self, named: dict, constexprs: dict) -> tuple:
        """What a winner depends on besides the buckets: the other key arguments, the dtypes, the constexprs."""
        return (tuple(named[k] for k in self.key if k in named and k not in self.buckets),
                tuple(str(a.dtype) for a in named.values() if isinstance(a, torch.Tensor)),
                tuple(sorted(constexprs.items())))

    def _prune(self, configs, named_args, **kwargs):
        """early_config_prune: compile each config for this device (Triton caches it for the timing that
        follows) and keep those that neither spill nor break a limit, so autotuning never times a spilling tile
        and never fails on one that cannot launch. After ready one config is left, the nearest tuned bucket's
        (else the first that fits), so that `_time` has nothing to compare."""
        if tuning.frozen():
            tuned = self.tuned.get(self._kind(named_args, kwargs), {})
            near = tuning.nearest(tuple(named_args[b] for b in self.buckets), tuned)
            if near is not None:
                return [tuned[near]]
        major, minor = torch.cuda.get_device_capability()

        def usage(config):
            kernel = self.kernel.warmup(grid=(1,), **named_args, **kwargs, **config.all_kwargs())
            try:
                kernel._init_handles()  # loads the binary: registers and spills as the driver reports them
            except triton.runtime.errors.OutOfResources:
                return None
            return Usage(kernel.n_regs, kernel.n_spills, kernel.metadata.shared, config.num_warps)

        kept = fitting(configs, usage, limits_for(10 * major + minor))
        return kept[:1] if tuning.frozen() else kept

    @staticmethod
    def _time(kernel_call, quantiles):
        """Triton's own timer, except after ready, when `_prune` left a single config and nothing is timed."""
        if tuning.frozen():
            return [0.0] * len(quantiles)
        return triton.testing.do_bench(kernel_call, quantiles=quantiles)

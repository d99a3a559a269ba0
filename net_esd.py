"""TempBalance's estimator on an ``nn.Module``: ``net_esd_estimator(net)`` gives a DataFrame of
per-layer ESD metrics (alpha, spectral norm, ...). ``esd_experiment.analyze`` gives the rows the
runner writes. The estimator lives in ``esd_experiment/estimator/``.
"""

from esd_experiment.estimator.net_esd import fit_from_evals, iter_layer_results, net_esd_estimator

__all__ = ["fit_from_evals", "iter_layer_results", "net_esd_estimator"]

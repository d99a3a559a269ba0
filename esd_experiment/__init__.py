"""Empirical spectral density metrics of every weight matrix of Hugging Face models.

    from esd_experiment import analyze, load_results
    df = analyze("org/name@revision")           # one model's rows, as the CLI writes them
    all_rows = load_results("results/")           # every result of a run's --output_dir

Both are imported when first used: ``import esd_experiment`` loads neither torch nor pandas.
The package's folders and the way their imports point: docs/architecture.md.
"""

__all__ = ["analyze", "load_results"]


def __getattr__(name: str):
    if name == "analyze":
        from esd_experiment.api import analyze

        return analyze
    if name == "load_results":
        from esd_experiment.core.results import load_results

        return load_results
    raise AttributeError(f"module 'esd_experiment' has no attribute {name!r}")

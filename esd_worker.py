"""One job of a run: ``python esd_worker.py --model_id org/name[@revision] --output_dir results/``
loads the model(s), computes the ESD of every weight matrix and writes one CSV per model.

The runner starts it for every job; it also runs alone. Its code lives in
``esd_experiment/run/worker.py`` (add a column there, or with ``--metric FILE.py:FUNCTION``).
"""

from esd_experiment.run.worker import command_line

if __name__ == "__main__":
    command_line()

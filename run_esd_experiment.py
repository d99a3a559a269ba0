"""ESD metrics for every model of a list: ``python run_esd_experiment.py --model_list models.csv
--output_dir results/`` (``--demo`` for an offline demo; ``--help`` for every flag).

The runner lives in ``esd_experiment/run/cli.py``; ``docs/architecture.md`` maps the package.
"""

import sys

from esd_experiment.run.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""Look at a results directory: ``python esd_report.py report RESULTS_DIR`` writes an offline
HTML report and ``summary.csv``; ``python esd_report.py refit RESULTS_DIR --output_dir NEW ...``
refits saved eigenvalues with new options or metrics, loading no model.

Its code lives in ``esd_experiment/report/cli.py``.
"""

import sys

from esd_experiment.report.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""Two dozen seeds of the fault campaign (tests/fault_campaign.py): each run under random faults
keeps every listed model done, failed or not reached, exactly once, exits 0 only when all are
done, and a clean rerun completes the list with the rows of a fault-free run. More seeds:
``python benchmarks/fault_campaign.py --seeds N``."""

import pytest

from tests.fault_campaign import build_zoo, campaign_seed, reference_run

# Two dozen seeds: together their faults cover every kind (5xx, resets, stalls, gated, a
# missing file, the hub down, a full disk as root, kill -9 of a worker and of the runner);
# about 8 s each on a 2-core machine.
SEEDS = tuple(range(24))


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    work = tmp_path_factory.mktemp("campaign")
    zoo = build_zoo(work / "zoo")
    return zoo, reference_run(zoo, work), work


@pytest.mark.parametrize("seed", SEEDS)
def test_every_model_is_accounted_for_under_faults(campaign, seed):
    zoo, reference, work = campaign
    report = campaign_seed(seed, zoo, reference, work)
    assert not report.broken, report.line()

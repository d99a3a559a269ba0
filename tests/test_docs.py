"""The documentation's promises, checked against the tool, so the two cannot drift apart."""

import argparse
import re
from pathlib import Path

import pytest

from esd_experiment.report import cli as report_cli
from esd_experiment.run import cli as run_cli
from esd_experiment.run import worker

ROOT = Path(__file__).resolve().parents[1]
FLAG_DOCS = ("docs/flags.md", "docs/clusters.md")  # where every command-line flag is listed


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every long option a parser (and its subcommands) accepts, but --help."""
    flags = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= parser_flags(sub)
        flags |= {s for s in action.option_strings if s.startswith("--") and s != "--help"}
    return flags


@pytest.mark.parametrize("parser", [run_cli.build_parser, worker.build_parser,
                                    report_cli.build_parser],
                         ids=["run_esd_experiment", "esd_worker", "esd_report"])
def test_every_flag_a_command_accepts_is_documented(parser):
    text = "".join((ROOT / doc).read_text(encoding="utf-8") for doc in FLAG_DOCS)
    documented = set(re.findall(r"--[a-z][a-z_-]*", text))
    hidden = {a.option_strings[0] for a in parser()._actions if a.help == argparse.SUPPRESS}
    missing = sorted(parser_flags(parser()) - documented - hidden)
    assert not missing, f"flags missing from {' or '.join(FLAG_DOCS)}: {missing}"


def test_the_runners_help_states_each_default_once(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    lines = [line for line in run_cli.build_parser().format_help().splitlines()
             if line.lstrip().startswith("--")]
    doubled = [line.strip() for line in lines if line.count("default:") > 1]
    assert not doubled, doubled

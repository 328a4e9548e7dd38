"The `anime-pose` console script: help, version, usage errors and exit codes."
import subprocess, sys
from pathlib import Path

from anime_pose import __version__
from anime_pose.cli import HELP, available_subcommands, main


def run(*args):
    return subprocess.run([str(Path(sys.executable).parent / 'anime-pose'), *args], capture_output=True, text=True)


def test_version():
    result = run('--version')
    assert result.returncode == 0 and result.stdout.strip() == f'anime-pose {__version__}'


def test_help_lists_available_subcommands_and_exit_codes():
    result = run('--help')
    assert result.returncode == 0 and 'exit codes' in result.stdout
    for name in available_subcommands(): assert name in result.stdout


def test_unknown_subcommand_is_a_usage_error():
    result = run('levitate')
    assert result.returncode == 2 and 'invalid choice' in result.stderr


def test_every_subcommand_of_the_contract_is_installed_with_its_help():
    contract = {'transfer', 'sheet', 'pose', 'synth', 'data', 'train', 'evaluate', 'calibrate', 'demo', 'export'}
    assert contract == set(HELP) and contract <= set(available_subcommands())
    for name, (entry_point, help) in available_subcommands().items():
        assert callable(entry_point.load()) and help == HELP[name]


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 0 and 'usage: anime-pose' in capsys.readouterr().out

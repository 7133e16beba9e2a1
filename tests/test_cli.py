"""The command line: its process-wide set-up, the command table, one option vocabulary."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from fisher_jax import cli
from fisher_jax.cli import use_compilation_cache


@pytest.fixture
def jax_cache_config():
    """use_compilation_cache also points JAX itself at the folder: put the session's back afterwards."""
    import jax

    saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


def test_compilation_cache_under_the_cache_root_and_switchable(monkeypatch, tmp_path, jax_cache_config):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("FISHER_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("FISHER_JAX_COMPILATION_CACHE", "0")
    use_compilation_cache()
    import os

    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
    monkeypatch.delenv("FISHER_JAX_COMPILATION_CACHE")
    use_compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "jax_compilation_cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")  # the user's own setting wins
    use_compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == "/elsewhere"


# ------------------------------------------------------------------------------------------------
# the command table and one vocabulary


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices[name]


def test_top_level_help_imports_no_jax():
    code = ("import sys\nfrom fisher_jax.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'optax', 'flax', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
    for command in cli.COMMANDS:
        assert command.name in out.stdout
    assert "task file" in out.stdout


def test_every_command_is_in_the_table_and_every_option_has_help():
    parser = cli.build_parser("all")
    assert list(_subparser(parser, c.name).prog.split()[-1] for c in cli.COMMANDS) == [c.name for c in cli.COMMANDS]
    for command in cli.COMMANDS:
        sub = _subparser(parser, command.name)
        assert sub.get_default("_unavailable") is None, command.name
        assert callable(sub.get_default("_run")), command.name
        for action in sub._actions:
            assert action.help, f"{command.name} {action.option_strings} has no help"
            if "--task" in action.option_strings or "--tasks" in action.option_strings:
                assert "task file" in action.help, command.name


def test_unavailable_commands_are_listed_with_the_reason(monkeypatch, tmp_path, capsys):
    (tmp_path / "broken_cmd_for_test.py").write_text("raise ImportError('needs the frobnicator')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + (
        cli.Command("absent", "fisher_jax.evaluate", "add", "run", "needs a package", ("no_such_package_xyz",)),
        cli.Command("broken", "broken_cmd_for_test", "add", "run", "a module that fails to import"),
    ))
    help_text = cli.build_parser().format_help()
    assert "needs a package (unavailable: no_such_package_xyz not installed)" in " ".join(help_text.split())
    assert cli.main(["broken", "--anything"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "fisher-jax broken: error: unavailable: ImportError: needs the frobnicator"
    assert "(unavailable: ImportError: needs the frobnicator)" in " ".join(cli.build_parser("all").format_help().split())


def test_old_spellings_still_work_but_are_hidden(capsys):
    parser = cli.build_parser("zoo")
    args = parser.parse_args(["zoo", "--out-root", "/z", "--results", "r.json", "--quiet", "--tasks", "sst2,mrpc",
                              "rte", "--seeds", "0", "1,2"])
    assert (args.out_dir, args.out, args.no_progress) == ("/z", "r.json", True)
    assert args.tasks == ["sst2", "mrpc", "rte"] and args.seeds == [0, 1, 2]
    err = capsys.readouterr().err
    assert "--out-root is deprecated; use --out-dir" in err and "--quiet is deprecated; use --no-progress" in err
    zoo_help = _subparser(parser, "zoo").format_help()
    assert "--out-root" not in zoo_help and "--results" not in zoo_help and "--quiet" not in zoo_help
    defaults = parser.parse_args(["zoo"])
    assert defaults.tasks == ["sst2", "mrpc", "stsb"] and defaults.seeds == [0] and not defaults.no_progress


def test_finetune_takes_out_dir_or_the_old_output_dir_and_a_task_file(tmp_path, capsys):
    from fisher_jax.train.finetune import config_from_args

    parser = cli.build_parser("finetune")
    task = str(tmp_path / "my.yaml")
    for flag in ("--out-dir", "--output-dir"):
        args = parser.parse_args(["finetune", "--task", task, "--model", "m", flag, "o", "--buckets", "16", "32,64"])
        config = config_from_args(args)
        assert (config.task, config.output_dir, config.buckets) == (task, "o", (16, 32, 64))
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--task", "rte", "--model", "m"])  # the folder stays required
    assert "--out-dir is required" in capsys.readouterr().err.replace("one of the arguments ", "")


def test_lists_split_commas_and_reject_bad_items(capsys):
    p = argparse.ArgumentParser(prog="t")
    cli.add_list(p, "--n", item_type=int, default=[7], help="numbers")
    assert p.parse_args([]).n == [7]
    assert p.parse_args(["--n", "1,2", "3", "--n", "4"]).n == [1, 2, 3, 4]
    with pytest.raises(SystemExit):
        p.parse_args(["--n", "1,x"])
    assert "--n: invalid value 'x'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="help"):
        cli.add_list(p, "--m")

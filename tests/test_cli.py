"""The `kat-jax` command line: one module per subcommand in kat_jax/commands, every subcommand has
--help, `--help` imports no heavy backend, and `--config NAME.py:VARIANT` resolves from the
current directory, then from the configs installed with the package (a built wheel holds them)."""

import os
import pkgutil
import shutil
import subprocess
import sys
import zipfile

import pytest

import kat_jax.commands
from kat_jax import cli
from kat_jax.training import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subcommands() -> dict:
    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if a.dest == "command"]
    return sub.choices


def test_commands_package_has_one_module_per_registered_subcommand():
    modules = {m.name for m in pkgutil.iter_modules(kat_jax.commands.__path__)}
    registered = {m.__name__.rsplit(".", 1)[1] for m in cli.COMMANDS}
    assert modules == registered
    names = [m.NAME for m in cli.COMMANDS]
    assert list(_subcommands()) == names  # registered in this order, by these modules
    for m in cli.COMMANDS:
        assert m.NAME.replace("-", "_") == m.__name__.rsplit(".", 1)[1]
        assert callable(m.add_parser) and callable(m.run)


@pytest.mark.parametrize("argv", [[], *([n] for n in [
    "train", "score", "import-hf", "export-hf", "prune", "rollout", "serve", "env", "compile-check",
    "presets", "eval", "plot"]), ["env", "check"]], ids=lambda a: " ".join(a) or "kat-jax")
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kat-jax {' '.join(argv)}".rstrip())


def test_help_imports_no_heavy_backend():
    code = ("import sys\nfrom kat_jax import cli\ncli.build_parser()\n"
            "heavy = [m for m in ('jax', 'numpy', 'kat_jax.training', 'kat_jax.envs', "
            "'kat_jax.rollout', 'kat_jax.models', 'kat_jax.data') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_config_overrides_only_for_train_and_compile_check(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["presets", "--config.train.steps=3"])
    assert e.value.code == 2
    assert "unrecognized arguments: --config.train.steps=3" in capsys.readouterr().err
    assert {m.NAME for m in cli.COMMANDS if getattr(m, "CONFIG_OVERRIDES", False)} == {
        "train", "compile-check"}


def test_errors_are_one_line_and_exit_1(tmp_path, capsys):
    assert cli.main(["prune", "--input", str(tmp_path / "nope.jsonl"), "--output",
                     str(tmp_path / "out.jsonl"), "--budget", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kat-jax: error: ") and "nope.jsonl" in err


# --config NAME.py:VARIANT


def test_bare_config_name_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_lib.load_train_config("sft.py:tiny", ["--config.train.steps=3"])
    assert cfg.train.steps == 3
    ref = config_lib.load_train_config(os.path.join(ROOT, "configs", "sft.py:tiny"))
    assert cfg.model.to_dict() == ref.model.to_dict()
    # the README's spelling works from anywhere too
    assert config_lib.load_train_config("configs/quickstart.py").keys() == \
        config_lib.load_train_config(os.path.join(ROOT, "configs", "quickstart.py")).keys()


def test_a_config_file_in_the_current_directory_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft.py").write_text(
        "import ml_collections\n\n\ndef get_config(variant=None):\n"
        "    return ml_collections.ConfigDict({'mine': variant})\n")
    assert config_lib.load_train_config("sft.py:tiny").mine == "tiny"


def test_unknown_config_lists_where_it_looked_and_the_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        config_lib.load_train_config("nope.py:tiny")
    msg = str(e.value)
    assert "nope.py: no such file" in msg and str(tmp_path / "nope.py") in msg
    assert os.path.join("configs", "nope.py") in msg  # the installed configs' directory
    for name in ("sft.py", "rl.py", "quickstart.py"):
        assert name in msg
    with pytest.raises(ValueError, match="no such file"):  # a path with a directory is not a name
        config_lib.load_train_config("elsewhere/sft.py:tiny")


def test_built_wheel_contains_the_configs(tmp_path):
    """`pip wheel` (no network: the installed setuptools) of a copy of the sources holds
    kat_jax/configs/*.py, so a plain install resolves bare config names."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("kat_jax", "configs"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=ignore)
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    [wheel] = os.listdir(tmp_path / "dist")
    names = set(zipfile.ZipFile(tmp_path / "dist" / wheel).namelist())
    configs = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
    assert configs and {f"kat_jax/configs/{f}" for f in configs} <= names
    assert "kat_jax/commands/train.py" in names and "kat_jax/data/records.py" in names

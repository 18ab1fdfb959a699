"""kat_jax.training.plots and `kat-jax plot`: PNGs of metrics.jsonl, one per metric against step."""

from __future__ import annotations

import json
import os

import pytest

from kat_jax import cli
from kat_jax.training import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROWS = [
    {"step": 1, "loss": 2.0, "reward": None, "step_time_s": 0.5},
    {"step": 2, "loss": 1.5, "entropy": 0.9},
    {"step": 3, "loss": "nan", "reward": 0.25, "entropy": 0.8},  # non-finite: logged as a string
    {"step": 4, "loss": 1.0, "reward": 0.5, "mfu": None},
]


def _write(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _check_png(path: str) -> None:
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    height, width = plots.FIGSIZE[1] * plots.DPI, plots.FIGSIZE[0] * plots.DPI
    assert matplotlib.image.imread(path).shape[:2] == (height, width)


def test_present_metrics_become_valid_pngs_of_the_expected_size(tmp_path):
    _write(tmp_path / "metrics.jsonl", ROWS)
    paths = plots.plot_metrics(str(tmp_path))
    # only default metrics with a value; step_time_s and mfu are not defaults
    assert [os.path.basename(p) for p in paths] == ["loss.png", "reward.png", "entropy.png"]
    assert sorted(os.listdir(tmp_path / "plots")) == ["entropy.png", "loss.png", "reward.png"]
    for p in paths:
        assert os.path.dirname(p) == str(tmp_path / "plots")
        _check_png(p)


def test_drawn_series_are_the_files_finite_values_with_nulls_skipped(tmp_path):
    _write(tmp_path / "metrics.jsonl", list(reversed(ROWS)))  # drawn in step order
    lines = plots.metric_lines(str(tmp_path))
    assert lines == {
        "loss": [plots.Line(None, [1, 2, 4], [2.0, 1.5, 1.0])],
        "reward": [plots.Line(None, [3, 4], [0.25, 0.5])],
        "entropy": [plots.Line(None, [2, 3], [0.9, 0.8])],
    }
    assert plots.metric_series(ROWS, "mfu") == ([], [])


def test_named_metrics_and_output_directory(tmp_path):
    _write(tmp_path / "run" / "metrics.jsonl", ROWS)
    out = tmp_path / "figs"
    paths = plots.plot_metrics(str(tmp_path / "run"), str(out), metrics=["step_time_s", "loss"])
    assert paths == [str(out / "step_time_s.png"), str(out / "loss.png")]
    assert not (tmp_path / "run" / "plots").exists()
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # renamed into place
    for p in paths:
        _check_png(p)


def test_pipeline_workdir_draws_one_png_per_metric_with_stages_following_each_other(tmp_path):
    # directory names sort rl < sft; stage order puts sft first
    _write(tmp_path / "sft" / "metrics.jsonl",
           [{"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.0}])
    _write(tmp_path / "rl" / "metrics.jsonl",
           [{"step": 2, "loss": 0.5, "reward": 0.1}, {"step": 4, "loss": 0.4, "reward": 0.3}])
    (tmp_path / "notes").mkdir()  # a directory without metrics.jsonl is not a stage
    paths = plots.plot_metrics(str(tmp_path))
    assert paths == [str(tmp_path / "plots" / "loss.png"), str(tmp_path / "plots" / "reward.png")]
    for p in paths:
        _check_png(p)
    assert plots.metric_lines(str(tmp_path)) == {
        "loss": [plots.Line("sft", [5, 10], [2.0, 1.0]), plots.Line("rl", [12, 14], [0.5, 0.4])],
        "reward": [plots.Line("rl", [12, 14], [0.1, 0.3])],
    }
    # an explicit order
    assert plots.metric_lines(str(tmp_path), ["loss"], stages=["rl", "sft"]) == {
        "loss": [plots.Line("rl", [2, 4], [0.5, 0.4]), plots.Line("sft", [9, 14], [2.0, 1.0])]}


def test_custom_stage_names_are_ordered_by_their_config_stage(tmp_path):
    for name, kind, loss in [("a_rl", "rl", 0.5), ("z_mid", "mid", 3.0)]:
        _write(tmp_path / name / "metrics.jsonl", [{"step": 1, "loss": loss}])
        (tmp_path / name / "config.json").write_text(json.dumps({"stage": kind}))
    assert [ln.label for ln in plots.metric_lines(str(tmp_path))["loss"]] == ["z_mid", "a_rl"]


@pytest.mark.parametrize("setup, kwargs, message", [
    (lambda d: None, {}, "metrics.jsonl: not found"),
    (lambda d: _write(d / "metrics.jsonl", []), {}, "no logged steps"),
    (lambda d: _write(d / "metrics.jsonl", [{"step": 1, "mfu": 0.1}]), {}, "none of the metrics"),
    (lambda d: _write(d / "metrics.jsonl", ROWS), {"metrics": ["lose"]},
     "metric 'lose' has no values; logged: entropy, loss, mfu, reward, step_time_s"),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 1}\n{"loss": 1.0}\n'), {},
     "metrics.jsonl:2: expected a JSON object"),
    (lambda d: (d / "metrics.jsonl").write_text("{oops\n"), {}, "metrics.jsonl:1: not JSON"),
    (lambda d: _write(d / "sft" / "metrics.jsonl", ROWS), {"stages": ["sft", "rl"]},
     "stage 'rl'"),
], ids=["missing", "empty", "no-default-metric", "unknown-metric", "no-step", "bad-json",
        "missing-stage"])
def test_errors_name_the_file_or_metric(tmp_path, setup, kwargs, message):
    setup(tmp_path)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as e:
        plots.plot_metrics(str(tmp_path), **kwargs)
    assert str(tmp_path) in str(e.value)
    assert not (tmp_path / "plots").exists() or not os.listdir(tmp_path / "plots")


def test_cli_prints_the_written_paths_as_one_json_line(tmp_path, capsys):
    _write(tmp_path / "metrics.jsonl", ROWS)
    assert cli.main(["plot", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert json.loads(out[0]) == [str(tmp_path / "plots" / f"{m}.png")
                                  for m in ("loss", "reward", "entropy")]
    assert cli.main(["plot", str(tmp_path), "--output", str(tmp_path / "o"),
                     "--metrics", "reward, mfu"]) == 1  # mfu is null on every line
    err = capsys.readouterr().err
    assert err.startswith("kat-jax: error: ") and "'mfu'" in err and str(tmp_path) in err
    assert cli.main(["plot", str(tmp_path), "--output", str(tmp_path / "o"),
                     "--metrics", "reward"]) == 0
    assert json.loads(capsys.readouterr().out) == [str(tmp_path / "o" / "reward.png")]


def test_cli_missing_workdir_is_one_error_line(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kat-jax: error: ") and "nope" in err


def test_step_logger_close_draws_pngs_and_never_fails_the_run(tmp_path, monkeypatch, caplog):
    from kat_jax.training.progress import StepLogger

    class _Bar:
        def close(self):
            pass

    class _Writer:
        def close(self):
            pass

    def logger(workdir):
        lg = StepLogger.__new__(StepLogger)  # close() only needs these
        lg.workdir, lg.bar, lg.writer = str(workdir), _Bar(), _Writer()
        return lg

    _write(tmp_path / "metrics.jsonl", ROWS)
    logger(tmp_path).close()
    assert sorted(os.listdir(tmp_path / "plots")) == ["entropy.png", "loss.png", "reward.png"]
    with caplog.at_level("WARNING"):
        logger(tmp_path / "empty").close()  # no metrics.jsonl: a warning, not an error
    assert "could not draw the metrics plots" in caplog.text


def test_gs_workdir_pipeline_pngs_are_written_there(gcs_bucket, tmp_path):
    from kat_jax import storage

    wd = f"{gcs_bucket}/plot_run"
    storage.write_text(f"{wd}/sft/metrics.jsonl", '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    storage.write_text(f"{wd}/rl/metrics.jsonl", '{"step": 1, "loss": 0.5, "reward": 0.2}\n')
    paths = plots.plot_metrics(wd)
    assert paths == [f"{wd}/plots/loss.png", f"{wd}/plots/reward.png"]
    for i, p in enumerate(paths):
        local = tmp_path / f"{i}.png"
        storage.copy_file(p, str(local))
        _check_png(str(local))
    assert plots.metric_lines(wd, ["loss"])["loss"][1] == plots.Line("rl", [3], [0.5])

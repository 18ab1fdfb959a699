"""PNG plots of a run's metrics.jsonl: one figure per metric against step.

    paths = plot_metrics(workdir)                 # WORKDIR/plots/<metric>.png, written atomically
    lines = metric_lines(workdir, ["loss"])       # what those figures draw: {metric: [Line]}

A stage workdir holds metrics.jsonl (kat_jax.training.metrics: one JSON object per logged step,
"step" plus metric values; a metric may be absent from a line, null, or a string such as "nan"
for a non-finite value: those points are skipped). A pipeline workdir holds no metrics.jsonl but
one stage directory each with its own; its figures have one line per stage, the stages' steps
offset so that each follows the one before it (offset = the sum of the earlier stages' last logged
steps) and dashed lines at the boundaries. Stages are ordered mid, sft, rft, rl (by directory
name, else by the "stage" of the directory's config.json), then by name; `stages` gives the order
explicitly.

Drawing uses matplotlib's Agg canvas on a plain Figure (no pyplot, so no global figure state and
no display backend). A gs:// workdir works too (kat_jax.storage: one object write is atomic).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence

from kat_jax import storage

DEFAULT_METRICS = ("loss", "reward", "pass_rate", "eval_loss", "kl_ref", "entropy",
                   "clip_fraction")
STAGE_ORDER = ("mid", "sft", "rft", "rl")
FIGSIZE = (6.4, 4.0)  # inches; at DPI this is a 640 x 400 pixel PNG
DPI = 100
METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class Line:
    """One drawn line: `label` is the stage (None for a stage workdir); `steps` are already
    offset for a pipeline; `values` are the finite numbers logged at those steps."""

    label: str | None
    steps: list[int]
    values: list[float]


@dataclasses.dataclass(frozen=True)
class Run:
    """The rows of one metrics.jsonl, sorted by step."""

    label: str | None
    path: str
    rows: list[dict]

    @property
    def last_step(self) -> int:
        return self.rows[-1]["step"] if self.rows else 0


def read_metrics(path: str) -> list[dict]:
    """The objects of a metrics.jsonl, sorted by step (stable). ValueError naming the file and
    line for a line that is not a JSON object with an integer "step"."""
    rows = []
    for n, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON: {e.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) \
                or isinstance(row["step"], bool):
            raise ValueError(f"{path}:{n}: expected a JSON object with an integer \"step\"")
        rows.append(row)
    rows.sort(key=lambda r: r["step"])
    return rows


def _stage_rank(workdir: str, name: str) -> tuple[int, str]:
    kind = name
    if name not in STAGE_ORDER:
        try:
            kind = json.loads(storage.read_text(storage.join(workdir, name, "config.json")))
            kind = kind.get("stage", name) if isinstance(kind, dict) else name
        except (OSError, ValueError):
            kind = name
    return (STAGE_ORDER.index(kind) if kind in STAGE_ORDER else len(STAGE_ORDER), name)


def stage_runs(workdir: str, stages: Sequence[str] | None = None) -> list[Run]:
    """[Run(None, ...)] for a stage workdir; for a pipeline workdir, one Run per stage directory
    holding a metrics.jsonl, in stage order (module docstring) or the order of `stages`."""
    own = storage.join(workdir, METRICS_FILE)
    if stages is None and storage.isfile(own):
        return [Run(None, own, read_metrics(own))]
    if stages is None:
        if not storage.isdir(workdir):
            raise ValueError(f"{workdir}: no such directory")
        stages = sorted((n for n in storage.listdir(workdir)
                         if storage.isfile(storage.join(workdir, n, METRICS_FILE))),
                        key=lambda n: _stage_rank(workdir, n))
        if not stages:
            raise ValueError(f"{own}: not found, and no stage directory of {workdir} has a "
                             f"{METRICS_FILE}")
    runs = []
    for name in stages:
        path = storage.join(workdir, name, METRICS_FILE)
        if not storage.isfile(path):
            raise ValueError(f"{path}: not found (stage {name!r})")
        runs.append(Run(name, path, read_metrics(path)))
    return runs


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def metric_series(rows: list[dict], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric: the rows where it is a finite number."""
    steps, values = [], []
    for row in rows:
        v = _number(row.get(metric))
        if v is not None:
            steps.append(row["step"])
            values.append(v)
    return steps, values


def metric_lines(workdir: str, metrics: Sequence[str] | None = None,
                 stages: Sequence[str] | None = None) -> dict[str, list[Line]]:
    """What plot_metrics draws: per metric, one Line per stage that logged it (pipeline steps
    offset). Default metrics: those of DEFAULT_METRICS with at least one value. ValueError for a
    requested metric without values, or when no default metric has any."""
    return _lines(workdir, stage_runs(workdir, stages), metrics)


def _lines(workdir: str, runs: list[Run], metrics: Sequence[str] | None) -> dict[str, list[Line]]:
    source = runs[0].path if len(runs) == 1 else f"{workdir} ({', '.join(r.label for r in runs)})"
    if not any(r.rows for r in runs):
        raise ValueError(f"{source}: no logged steps")
    offsets, total = [], 0
    for r in runs:
        offsets.append(total)
        total += r.last_step
    lines: dict[str, list[Line]] = {}
    for m in (DEFAULT_METRICS if metrics is None else metrics):
        drawn = []
        for r, off in zip(runs, offsets):
            steps, values = metric_series(r.rows, m)
            if steps:
                drawn.append(Line(r.label, [s + off for s in steps], values))
        if drawn:
            lines[m] = drawn
        elif metrics is not None:
            logged = sorted({k for r in runs for row in r.rows for k in row} - {"step"})
            raise ValueError(f"{source}: metric {m!r} has no values; logged: {', '.join(logged)}")
    if not lines:
        raise ValueError(f"{source}: none of the metrics {', '.join(DEFAULT_METRICS)} has a value;"
                         " name others with metrics=")
    return lines


def render_png(metric: str, lines: list[Line], title: str,
               boundaries: Sequence[int] = ()) -> bytes:
    """One figure (FIGSIZE at DPI) of `lines` as PNG bytes; dashed verticals at `boundaries`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for line in lines:
        ax.plot(line.steps, line.values, label=line.label,
                marker="." if len(line.steps) < 30 else None, linewidth=1.2)
    for b in boundaries:
        ax.axvline(b, color="0.6", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step" if all(ln.label is None for ln in lines) else "step (stages in order)")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if any(ln.label is not None for ln in lines):
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _write_bytes(path: str, data: bytes) -> None:
    """Whole or not at all: a local file through a temporary file and rename; one remote object
    write is atomic by itself."""
    if storage.is_remote(path):
        storage.path(path).write_bytes(data)
        return
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; these are for everyone to read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plot_metrics(workdir: str, out_dir: str | None = None, metrics: Sequence[str] | None = None,
                 stages: Sequence[str] | None = None) -> list[str]:
    """Write <out_dir or WORKDIR/plots>/<metric>.png for each metric of metric_lines (a "/" in a
    metric name becomes "_" in the file name); return the paths in metric order."""
    runs = stage_runs(workdir, stages)
    lines = _lines(workdir, runs, metrics)
    boundaries, total = [], 0
    for r in runs[:-1]:
        total += r.last_step
        boundaries.append(total)
    out_dir = out_dir or storage.join(workdir, "plots")
    storage.makedirs(out_dir)
    name = os.path.basename(str(workdir).rstrip("/")) or str(workdir)
    paths = []
    for m, ls in lines.items():
        path = storage.join(out_dir, m.replace("/", "_") + ".png")
        _write_bytes(path, render_png(m, ls, f"{m} ({name})", boundaries))
        paths.append(path)
    return paths

"""The test runner that SWE task mining copies into a sandbox and runs there (stdlib + pytest).

    python mine_runner.py PLAN.json [PYTEST_DIR]

Unlike the grader's runner (swe_test_runner, which runs named tests), this one discovers and runs a
repository's whole suite, several times, in one interpreter, between steps that change the working
copy. PLAN.json is a list of steps, run in order in the working copy (the current directory):

- ``{"op": "run", "label": L, "repeat": N, "profile": bool, "longrepr": bool}``: runs the suite
  (pytest's own discovery from the current directory) N times; before each run the repository's
  modules (those whose file lies under the current directory, the modules named below them and
  the import hooks their code added) are dropped, so each run imports the code afresh.
  ``profile`` records the repository functions called during the run; ``longrepr`` keeps each
  failure's report text (cut to 2,000 characters).
- ``{"op": "apply", "patch": PATH}``: ``git apply`` of a patch file (a failure stops the plan).
- ``{"op": "write", "path": REL, "from": PATH}``: replaces a working-copy file by a file's bytes.

PATHs are relative to PLAN.json's directory.

The last stdout line after ``__KAT_MINE_RESULTS__`` is JSON: ``{"runs": {L: [run, ...]},
"error": str | None}``; a run is ``{"results": {node id: outcome}, "collect_errors": [path],
"exit_code", "called": [[path, name, first line], ...], "longrepr": {node id: text}}``, with the
outcomes of swe_test_runner (passed, failed, error, skipped, xfailed, xpassed). Repeated runs in
one interpreter share what the code keeps outside its modules (files, environment variables): a
test that depends on such state shows up as flaky, which is what the repeats are for.
"""

import json
import os
import subprocess
import sys

MARK = "__KAT_MINE_RESULTS__"
LONGREPR_CHARS = 2000


def import_pytest(pytest_dir):
    try:
        import pytest
        return pytest
    except ImportError:
        pass
    if pytest_dir and os.path.isdir(pytest_dir):
        sys.path.append(pytest_dir)
        import pytest
        return pytest
    raise ImportError("no pytest in the sandbox and none provided")


def _purge(root):
    """Drops the modules loaded from under ``root`` (the repository's code and tests), the modules
    named below them (e.g. six's ``six.moves.*``, which have no file) and the import hooks their
    code put on ``sys.meta_path``."""
    gone = set()
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None)
        if path and os.path.realpath(path).startswith(root + os.sep):
            gone.add(name)
    for name in list(sys.modules):
        if name in gone or any(name.startswith(g + ".") for g in gone):
            del sys.modules[name]
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ not in gone]


def run_suite(pytest, root, profile, longrepr):
    outcomes, collect_errors, texts, called = {}, [], {}, set()

    class Record:
        def pytest_collectreport(self, report):
            if report.failed:
                collect_errors.append(report.nodeid)

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                if hasattr(report, "wasxfail"):
                    outcome = "xfailed" if report.outcome == "skipped" else "xpassed"
                elif report.when != "call" and report.outcome == "failed":
                    outcome = "error"
                else:
                    outcome = report.outcome
                if outcomes.get(report.nodeid) in (None, "passed"):
                    outcomes[report.nodeid] = outcome
                    if longrepr and outcome in ("failed", "error") and report.nodeid not in texts:
                        texts[report.nodeid] = str(report.longreprtext)[-LONGREPR_CHARS:]

    def prof(frame, event, arg):
        if event == "call":
            code = frame.f_code
            called.add((code.co_filename, code.co_name, code.co_firstlineno))

    _purge(root)
    if profile:
        sys.setprofile(prof)
    try:
        code = int(pytest.main(["-q", "-p", "no:cacheprovider", "--continue-on-collection-errors"],
                               plugins=[Record()]))
    finally:
        sys.setprofile(None)
    mine = []
    for path, name, line in sorted(called):
        full = os.path.realpath(path)
        if full.startswith(root + os.sep):
            mine.append([os.path.relpath(full, root), name, line])
    return {"results": outcomes, "collect_errors": collect_errors, "exit_code": code,
            "called": mine, "longrepr": texts}


def main(argv):
    with open(argv[1]) as f:
        plan = json.load(f)
    here = os.path.dirname(os.path.abspath(argv[1]))
    root = os.path.realpath(os.getcwd())
    sys.path.insert(0, root)
    sys.dont_write_bytecode = True        # a rewritten file of the same size must not hit a stale .pyc
    out = {"runs": {}, "error": None}
    try:
        pytest = import_pytest(argv[2] if len(argv) > 2 else "")
        for step in plan:
            if step["op"] == "run":
                runs = out["runs"].setdefault(step["label"], [])
                for _ in range(int(step.get("repeat", 1))):
                    runs.append(run_suite(pytest, root, step.get("profile", False),
                                          step.get("longrepr", False)))
            elif step["op"] == "apply":
                r = subprocess.run(["git", "-c", "safe.directory=*", "apply", "--whitespace=nowarn",
                                    os.path.join(here, step["patch"])],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"patch {os.path.basename(step['patch'])} does not apply: "
                                       f"{r.stderr.strip()[-500:]}")
            elif step["op"] == "write":
                with open(os.path.join(here, step["from"]), "rb") as src:
                    data = src.read()
                with open(step["path"], "wb") as dst:
                    dst.write(data)
            else:
                raise ValueError(f"unknown step {step['op']!r}")
    except Exception as e:  # noqa: BLE001  (reported to the miner, which counts the skip)
        out["error"] = f"{type(e).__name__}: {e}"
    sys.stdout.flush()
    print("\n" + MARK + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv)

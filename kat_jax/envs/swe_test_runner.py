"""The hidden-test runner that the SWE grader copies into a sandbox and runs there (stdlib only).

    python run_tests.py TESTS.json [PYTEST_DIR]

TESTS.json is a list of test ids in pytest's node-id form: ``path.py`` (every test of a file),
``path.py::test_f``, ``path.py::TestC::test_m``, ``path.py::test_p[1-2]`` (one parametrised case).
The last stdout line after ``__KAT_TEST_RESULTS__`` is JSON: ``{"results": {id: outcome},
"runner": ..., "exit_code": ...}`` with outcomes ``passed``, ``failed``, ``error`` (setup, import or
collection failed), ``skipped``, ``xfailed``, ``xpassed`` and ``not_found`` (no such file or test).
A file or class id is ``passed`` when all its tests pass, else its worst outcome.

Runner: pytest, from the sandbox's own python when it has it, else from ``PYTEST_DIR`` (the
read-only copy of pytest that kat_jax places in the sandbox), else (or with
``KAT_TEST_RUNNER=unittest``) a built-in collector that runs plain ``test_*`` functions, ``Test*``
classes (``setup_method``/``teardown_method``, ``setup_class``/``teardown_class``),
``unittest.TestCase`` classes and module-level ``setup_module``/``teardown_module`` as pytest
does; what needs pytest itself (fixtures as arguments, parametrised ids) is reported as ``error``
with the reason. If this script itself dies, no marker line is printed: the grader treats that as an
infrastructure failure.
"""

import importlib
import inspect
import json
import os
import sys
import traceback
import unittest

MARK = "__KAT_TEST_RESULTS__"
RANK = {"passed": 0, "xfailed": 0, "skipped": 1, "xpassed": 2, "failed": 3, "error": 4,
        "not_found": 5}


def _is_pass(outcome):
    return outcome in ("passed", "xfailed")


def _aggregate(outcomes):
    """One outcome for a file or class id: passed when all pass, else the worst one."""
    if not outcomes:
        return "not_found"
    if all(_is_pass(o) for o in outcomes):
        return "passed"
    return max(outcomes, key=lambda o: RANK.get(o, 4))


def _under(nodeid, tid):
    return nodeid == tid or nodeid.startswith(tid + "::") or nodeid.startswith(tid + "[")


def import_pytest(pytest_dir):
    """(pytest module, where it came from) or (None, reason)."""
    if os.environ.get("KAT_TEST_RUNNER") == "unittest":
        return None, "KAT_TEST_RUNNER=unittest"
    try:
        import pytest
        return pytest, "pytest (sandbox python)"
    except ImportError:
        pass
    if pytest_dir and os.path.isdir(pytest_dir):
        sys.path.append(pytest_dir)
        try:
            import pytest
            return pytest, "pytest (provided by kat_jax)"
        except Exception as e:  # noqa: BLE001  (e.g. too old a python for the provided pytest)
            sys.path.remove(pytest_dir)
            for name in [m for m in sys.modules if m.split(".")[0] in ("pytest", "_pytest")]:
                del sys.modules[name]
            return None, f"provided pytest does not import: {type(e).__name__}: {e}"
    return None, "no pytest in the sandbox"


def run_pytest(pytest, ids):
    """Runs the files of ``ids`` with pytest, keeping only the requested tests."""
    results, outcomes, collect_errors, seen = {}, {}, set(), set()
    files = []
    for tid in ids:
        path = tid.split("::")[0]
        if not os.path.exists(path):
            results[tid] = "not_found"
        elif path not in files:
            files.append(path)

    class Select:
        def pytest_collection_modifyitems(self, session, config, items):
            keep = [it for it in items if any(_under(it.nodeid, t) for t in ids)]
            drop = [it for it in items if it not in keep]
            if drop:
                config.hook.pytest_deselected(items=drop)
            items[:] = keep
            seen.update(it.nodeid for it in keep)

        def pytest_collectreport(self, report):
            if report.failed:
                collect_errors.add(report.nodeid)

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

    code = None
    if files:
        code = int(pytest.main(["-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                                *files], plugins=[Select()]))
    for tid in ids:
        if tid in results:
            continue
        mine = [o for n, o in outcomes.items() if _under(n, tid)]
        if tid in outcomes:
            results[tid] = outcomes[tid]
        elif mine:
            results[tid] = _aggregate(mine)
        elif any(_under(n, tid) for n in seen):
            results[tid] = "error"           # selected but never reported: the run was cut short
        elif any(e and (tid == e or tid.startswith(e + "::") or e.startswith(tid))
                 for e in collect_errors):
            results[tid] = "error"           # its file (or class) failed to collect
        else:
            results[tid] = "not_found"
    return results, code


# -- the built-in collector (no pytest) -------------------------------------------------------------
def _import_path(path):
    """Imports a test file as pytest's default (prepend) mode does: the first directory upward
    without an ``__init__.py`` goes on sys.path and the module is named from there."""
    path = os.path.abspath(path)
    base, parts = os.path.dirname(path), [os.path.splitext(os.path.basename(path))[0]]
    while os.path.isfile(os.path.join(base, "__init__.py")):
        base, parts = os.path.dirname(base), [os.path.basename(base), *parts]
    if base not in sys.path:
        sys.path.insert(0, base)
    return importlib.import_module(".".join(parts))


def _call(fn, *args):
    """Runs one test callable: its outcome name and, on failure, the traceback's last line."""
    try:
        fn(*args)
    except unittest.SkipTest:
        return "skipped"
    except Exception:  # noqa: BLE001  (a test failing with any exception fails)
        print(traceback.format_exc(), file=sys.stderr)
        return "failed"
    return "passed"


def _needs_fixtures(fn, bound):
    params = list(inspect.signature(fn).parameters)
    return params[1:] if bound else params


class Unittest:
    """Runs test ids without pytest (see the module docstring)."""

    def __init__(self):
        self.modules = {}

    def module(self, path):
        if path not in self.modules:
            mod = _import_path(path)
            if hasattr(mod, "setup_module"):
                mod.setup_module()
            self.modules[path] = mod
        return self.modules[path]

    def close(self):
        for mod in self.modules.values():
            if hasattr(mod, "teardown_module"):
                try:
                    mod.teardown_module()
                except Exception:  # noqa: BLE001
                    traceback.print_exc()

    @staticmethod
    def tests_of_class(cls):
        if issubclass(cls, unittest.TestCase):
            return unittest.defaultTestLoader.getTestCaseNames(cls)
        return sorted(n for n in dir(cls) if n.startswith("test") and callable(getattr(cls, n)))

    def run_method(self, cls, name):
        if issubclass(cls, unittest.TestCase):
            res = unittest.TestResult()
            cls(name).run(res)
            if res.errors or res.failures:
                for _, tb in res.errors + res.failures:
                    print(tb, file=sys.stderr)
                return "failed"
            return "skipped" if res.skipped else "passed"
        if "__init__" in cls.__dict__:
            return "error"                   # pytest does not collect classes with __init__ either
        if _needs_fixtures(getattr(cls, name), bound=True):
            return "error"
        inst = cls()
        method = getattr(inst, name)
        for hook in ("setup_class",):
            if hasattr(cls, hook) and _call(getattr(cls, hook)) != "passed":
                return "error"
        if hasattr(inst, "setup_method") and _call(inst.setup_method, method) != "passed":
            return "error"
        outcome = _call(method)
        if hasattr(inst, "teardown_method") and _call(inst.teardown_method, method) != "passed":
            outcome = "error" if outcome == "passed" else outcome
        if hasattr(cls, "teardown_class"):
            _call(cls.teardown_class)
        return outcome

    def run_function(self, mod, fn):
        if _needs_fixtures(fn, bound=False):
            return "error"
        if hasattr(mod, "setup_function") and _call(mod.setup_function, fn) != "passed":
            return "error"
        outcome = _call(fn)
        if hasattr(mod, "teardown_function"):
            _call(mod.teardown_function, fn)
        return outcome

    def whole_module(self, mod):
        out = []
        for name, obj in sorted(vars(mod).items()):
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj) and (name.startswith("Test")
                                         or issubclass(obj, unittest.TestCase)):
                out += [self.run_method(obj, m) for m in self.tests_of_class(obj)]
            elif inspect.isfunction(obj) and name.startswith("test"):
                out.append(self.run_function(mod, obj))
        return out

    def run(self, tid):
        path, *rest = tid.split("::")
        if not os.path.isfile(path):
            return "not_found"
        if rest and "[" in rest[-1]:
            print(f"{tid}: a parametrised test needs pytest", file=sys.stderr)
            return "error"
        try:
            mod = self.module(path)
        except Exception:  # noqa: BLE001  (import or setup_module failure)
            print(traceback.format_exc(), file=sys.stderr)
            return "error"
        if not rest:
            return _aggregate(self.whole_module(mod))
        obj = getattr(mod, rest[0], None)
        if obj is None:
            return "not_found"
        if inspect.isclass(obj):
            if len(rest) == 1:
                return _aggregate([self.run_method(obj, m) for m in self.tests_of_class(obj)])
            if len(rest) == 2 and callable(getattr(obj, rest[1], None)):
                return self.run_method(obj, rest[1])
            return "not_found"
        if len(rest) == 1 and inspect.isfunction(obj):
            return self.run_function(mod, obj)
        return "not_found"


def run_unittest(ids):
    runner = Unittest()
    try:
        return {tid: runner.run(tid) for tid in ids}, None
    finally:
        runner.close()


def main(argv):
    with open(argv[1]) as f:
        ids = [str(t) for t in json.load(f)]
    sys.path.insert(0, os.getcwd())        # the repository importable, as `python -m pytest` does
    pytest, how = import_pytest(argv[2] if len(argv) > 2 else "")
    if pytest is not None:
        results, code = run_pytest(pytest, ids)
    else:
        print(f"kat_jax test runner: built-in collector ({how})", file=sys.stderr)
        results, code = run_unittest(ids)
        how = f"built-in collector ({how})"
    sys.stdout.flush()
    print("\n" + MARK + json.dumps({"results": results, "runner": how, "exit_code": code}))


if __name__ == "__main__":
    main(sys.argv)

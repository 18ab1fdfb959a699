"""SWE task mining (kat_jax.envs.swe_mining, swe_mutations, `kat-jax swe mine`) on small git
repositories built here: which commits become instances, with exactly which FAIL_TO_PASS /
PASS_TO_PASS lists; mined and synthesised instances grade gold 1, empty 0 through `env check`;
bad input fails cleanly with nothing written."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from kat_jax.envs import swe_mining as sm
from kat_jax.envs import swe_mutations as mu
from kat_jax.envs.check import check

CORE = '''\
def add(a, b):
    return a + b


def mean(xs):
    return sum(xs) / len(xs)


def clamp(x, lo, hi):
    if x < lo:
        return lo
    if x > hi:
        return hi
    return x
'''

TEST_CORE = '''\
from calc.core import add, clamp


def test_add():
    assert add(2, 3) == 5


def test_clamp():
    assert clamp(5, 0, 3) == 3
    assert clamp(-1, 0, 3) == 0
    assert clamp(2, 0, 3) == 2
'''

FLAKY = '''\
import os


def test_sometimes():
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "kat_flaky_state")
    n = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(n + 1))
    assert n % 2 == 0
'''

TEST_MEAN = '''\
from calc.core import mean


def test_mean_values():
    assert mean([1, 2, 3]) == 2


def test_mean_empty():
    assert mean([]) == 0.0
'''

TEST_SUB = '''\
from calc.core import sub


def test_sub():
    assert sub(5, 3) == 2
'''

FIX_MSG = ("Fix mean of an empty list\n\nmean([]) raised ZeroDivisionError; the mean of no values "
           "is documented to be 0.0.")


def _git(repo, *args):
    env = {**os.environ, "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
           "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z", "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo),
                           *args], check=True, capture_output=True, text=True, env=env).stdout


def _commit(repo, message, files):
    for path, text in files.items():
        full = repo / path
        full.parent.mkdir(parents=True, exist_ok=True)
        full.write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD").strip()


def make_history(root):
    """calc: 1 root; 2 a flaky test (tests only); 3 a fix with its test (the instance); 4 a refactor
    without tests; 5 a new function whose change breaks test_add; 6 a fix whose message is too
    short; 7 a fix whose message quotes the fix. Returns {step: commit}."""
    repo = root / "calc"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    c = {1: _commit(repo, "Initial calc package", {
        "calc/__init__.py": "", "calc/core.py": CORE, "tests/__init__.py": "",
        "tests/test_core.py": TEST_CORE, "README.md": "calc\n"})}
    c[2] = _commit(repo, "Add a test that depends on the run count", {"tests/test_flaky.py": FLAKY})
    fixed = CORE.replace("    return sum(xs) / len(xs)",
                         "    if not xs:\n        return 0.0\n    return sum(xs) / len(xs)")
    c[3] = _commit(repo, FIX_MSG, {"calc/core.py": fixed, "tests/test_mean.py": TEST_MEAN})
    refactored = fixed.replace("    if x < lo:\n        return lo\n    if x > hi:\n        return hi\n"
                               "    return x\n", "    return max(lo, min(x, hi))\n")
    c[4] = _commit(repo, "Refactor clamp into one expression, no behaviour change",
                   {"calc/core.py": refactored})
    broken = refactored.replace("    return a + b\n", "    return a + b + 1\n") + \
        "\n\ndef sub(a, b):\n    return a - b\n"
    c[5] = _commit(repo, "Add sub, and change add while at it (this breaks the add test)",
                   {"calc/core.py": broken, "tests/test_sub.py": TEST_SUB})
    repaired = broken.replace("    return a + b + 1\n", "    return a + b\n")
    c[6] = _commit(repo, "fix add", {"calc/core.py": repaired,
                                     "tests/test_core.py": TEST_CORE + "\n\ndef test_add_zero():\n"
                                     "    assert add(0, 0) == 0\n"})
    c[7] = _commit(repo, "Add double() for callers that scale values by two; its body is just\n\n"
                   "    return x * 2\n", {
                       "calc/core.py": repaired + "\n\ndef double(x):\n    return x * 2\n",
                       "tests/test_double.py": "from calc.core import double\n\n\n"
                       "def test_double():\n    assert double(4) == 8\n"})
    return repo, c


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    return make_history(tmp_path_factory.mktemp("hist"))


@pytest.fixture(scope="module")
def mined(history, tmp_path_factory):
    repo, commits = history
    out = tmp_path_factory.mktemp("out") / "tasks.jsonl"
    res = sm.mine(str(repo), str(out), opts=sm.MineOptions(verify=False, workers=2))
    return out, res, commits


def test_mining_keeps_exactly_the_fix_with_its_test(mined):
    out, res, c = mined
    assert [i["mined"]["commit"] for i in res.instances] == [c[3]]
    inst = json.loads(out.read_text().splitlines()[0])
    assert inst["FAIL_TO_PASS"] == ["tests/test_mean.py::test_mean_empty"]
    assert inst["PASS_TO_PASS"] == ["tests/test_core.py::test_add", "tests/test_core.py::test_clamp",
                                    "tests/test_mean.py::test_mean_values"]
    assert inst["mined"]["flaky"] == ["tests/test_flaky.py::test_sometimes"]
    assert inst["problem_statement"] == FIX_MSG
    assert "calc/core.py" in inst["patch"] and "tests/" not in inst["patch"]
    assert "tests/test_mean.py" in inst["test_patch"] and "calc/core.py" not in inst["test_patch"]
    assert inst["repo_path"] == "tasks.repos/" + inst["instance_id"]
    tree = out.parent / inst["repo_path"]
    assert not (tree / ".git").exists() and not (tree / "tests" / "test_mean.py").exists()


def test_mining_counts_each_rejected_commit_under_its_filter(mined):
    _, res, c = mined
    why = {cid: reason for cid, reason, _ in res.skipped}
    ids = {n: f"local__calc-{c[n][:10]}" for n in c}
    assert why == {ids[2]: "no_source_change", ids[4]: "no_test_change",
                   ids[5]: "gold_breaks_tests", ids[6]: "statement_too_short",
                   ids[7]: "statement_leaks_patch"}
    detail = {cid: d for cid, _, d in res.skipped}
    assert detail[ids[5]] == "tests/test_core.py::test_add"
    assert res.stats["candidates"] == 6 and res.stats["kept"] == 1


def test_mined_instances_grade_gold_one_empty_zero_in_env_check(mined, capsys):
    from kat_jax import cli

    out, res, _ = mined
    assert cli.main(["env", "check", "--env", "swe", "--tasks", str(out)]) == 0
    table = capsys.readouterr().out
    assert res.instances[0]["instance_id"] in table and "1 tasks, 0 broken" in table


def test_mutations_edit_only_the_operator_literal_or_statement():
    src = ("def f(xs, n):\n    if not xs:\n        return 0\n    total = xs[0] + n\n"
           "    return total if total < 10 and n else -1\n")
    sites = mu.mutation_sites(src, "m.py")
    got = {(m.kind, mu.apply_mutation(src, m)) for m in sites}
    line4, line5 = "    total = xs[0] + n\n", "    return total if total < 10 and n else -1\n"
    head = "def f(xs, n):\n    if not xs:\n        return 0\n"
    assert got == {
        ("remove_condition", "def f(xs, n):\n" + line4 + line5),
        ("off_by_one", head + "    total = xs[1] + n\n" + line5),
        ("binop_swap", head + "    total = xs[0] - n\n" + line5),
        ("boolop_swap", head + line4 + "    return total if total < 10 or n else -1\n"),
        ("compare_swap", head + line4 + "    return total if total <= 10 and n else -1\n"),
        ("off_by_one", head + line4 + "    return total if total < 11 and n else -1\n"),
    }
    assert mu.mutation_sites(src, "m.py", covered={("g", 1)}) == []


def test_synthesised_bugs_grade_gold_one_empty_zero(history, tmp_path):
    from kat_jax import cli

    repo, _ = history
    out = tmp_path / "synth.jsonl"
    stats = tmp_path / "stats.json"
    code = cli.main(["swe", "mine", "--repo", str(repo), "--output", str(out), "--since", "HEAD",
                     "--synthesize", "1", "--no-verify", "--stats", str(stats)])
    assert code == 0
    insts = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(insts) == 1
    for inst in insts:
        assert inst["mined"]["from"] == "mutation" and inst["test_patch"] == ""
        assert inst["FAIL_TO_PASS"] and "tests/test_flaky.py::test_sometimes" not in \
            inst["FAIL_TO_PASS"] + inst["PASS_TO_PASS"]
        assert inst["FAIL_TO_PASS"][0] in inst["problem_statement"]
        # the tree holds the bug; the gold patch puts the original calc/core.py back
        tree = out.parent / inst["repo_path"]
        assert (tree / "calc" / "core.py").read_text() != (repo / "calc" / "core.py").read_text()
    assert json.loads(stats.read_text())["stats"]["synth_kept"] == 1
    rows = check("swe", str(out), workers=1)
    assert [(r["gold"], r["empty"], r["ok"]) for r in rows] == [(1.0, 0.0, True)], rows


def test_prs_file_gives_issue_statements_and_counts_missing_merge_commits(history, tmp_path):
    repo, c = history
    prs = tmp_path / "prs.jsonl"
    issue = {"title": "mean() of an empty list crashes",
             "body": "Calling mean([]) raises ZeroDivisionError instead of returning 0.0."}
    prs.write_text(json.dumps({"number": 7, "merge_commit": c[3], "title": "Fix mean", "body": "",
                               "issue": issue, "labels": ["bug"], "stars": 10}) + "\n"
                   + json.dumps({"number": 8, "merge_commit": "f" * 40, "stars": 10}) + "\n"
                   + json.dumps({"number": 9, "merge_commit": c[4], "stars": 0}) + "\n")
    res = sm.mine(str(repo), str(tmp_path / "t.jsonl"), prs=str(prs),
                  opts=sm.MineOptions(verify=False, min_stars=5))
    (inst,) = res.instances
    assert inst["instance_id"] == "local__calc-7"
    assert inst["problem_statement"] == issue["title"] + "\n\n" + issue["body"]
    assert inst["FAIL_TO_PASS"] == ["tests/test_mean.py::test_mean_empty"]
    assert inst["mined"]["pr"] == {"number": 7, "labels": ["bug"], "stars": 10}
    assert [(i, r) for i, r, _ in res.skipped] == [("local__calc-8", "bad_revision")]
    assert res.stats["candidates"] == 2     # PR 9 is below min_stars


def test_bad_repository_and_revision_are_clear_errors_with_nothing_written(history, tmp_path,
                                                                            capsys):
    from kat_jax import cli

    repo, _ = history
    out = tmp_path / "t.jsonl"
    plain = tmp_path / "plain"
    plain.mkdir()
    assert cli.main(["swe", "mine", "--repo", str(plain), "--output", str(out)]) == 1
    assert "not a git repository" in capsys.readouterr().err
    assert cli.main(["swe", "mine", "--repo", str(repo), "--output", str(out),
                     "--since", "no-such-tag"]) == 1
    assert "revision 'no-such-tag' does not exist" in capsys.readouterr().err
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"test_cmd": "pytest {test}"}))
    assert cli.main(["swe", "mine", "--repo", str(repo), "--output", str(out),
                     "--spec", str(spec)]) == 1
    assert "`test_cmd` is not supported by mining" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["plain", "spec.json"]


def test_failing_setup_is_a_counted_skip(history, tmp_path):
    repo, _ = history
    res = sm.mine(str(repo), str(tmp_path / "t.jsonl"), max_candidates=3,
                  opts=sm.MineOptions(spec={"install": "exit 3"}, verify=False))
    assert res.instances == [] and res.stats["setup_failed"] == 1
    (row,) = [r for r in res.skipped if r[1] == "setup_failed"]
    assert "setup command 'exit 3' failed" in row[2]
    assert sorted(os.listdir(tmp_path)) == ["t.jsonl", "t.repos"]
    assert (tmp_path / "t.jsonl").read_text() == "" and os.listdir(tmp_path / "t.repos") == []


def test_interrupted_mining_leaves_the_earlier_output_untouched(history, tmp_path, monkeypatch):
    repo, _ = history
    out = tmp_path / "t.jsonl"
    out.write_text("earlier\n")

    def stop(inst, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(sm, "_start", stop)
    with pytest.raises(KeyboardInterrupt):
        sm.mine(str(repo), str(out), opts=sm.MineOptions(verify=False, workers=2))
    assert sorted(os.listdir(tmp_path)) == ["t.jsonl"] and out.read_text() == "earlier\n"


def test_classify_rules():
    def run(**res):
        return {"results": {k.replace("__", "::"): v for k, v in res.items()},
                "collect_errors": []}

    before = [run(new__a="failed", new__b="passed", old__c="passed", old__d="passed",
                  old__e="failed", old__f="passed"),
              run(new__a="failed", new__b="passed", old__c="passed", old__d="passed",
                  old__e="failed", old__f="failed")]
    after = [run(new__a="passed", new__b="passed", old__c="passed", old__d="failed",
                 old__e="passed", old__f="passed")] * 2
    after_ = [dict(r, results={**r["results"], "new::g": "passed"}) for r in after]
    before_ = [dict(r, collect_errors=["new"]) for r in before]
    s = sm.classify(before_, after_, ["new"])
    assert (s.f2p, s.p2p, s.flaky, s.broken) == (["new::a", "new::g"], ["new::b", "old::c"],
                                                 ["old::f"], ["old::d"])


def test_pip_packages_go_into_one_cached_venv_that_setup_and_tests_use(history, tmp_path):
    import shutil
    import tempfile
    import zipfile

    repo, c = history
    cache = tempfile.mkdtemp(prefix="kat-venv-test-")     # readable by the sandbox's own uid
    os.chmod(cache, 0o755)
    try:
        whl = os.path.join(cache, "tinydep-0.1-py3-none-any.whl")
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr("tinydep.py", "VALUE = 41\n")
            z.writestr("tinydep-0.1.dist-info/METADATA",
                       "Metadata-Version: 2.1\nName: tinydep\nVersion: 0.1\n")
            z.writestr("tinydep-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: t\n"
                       "Root-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr("tinydep-0.1.dist-info/RECORD", "")
        spec = {"pip_packages": ["--no-index", whl],
                "setup_cmds": "python -c 'import tinydep' > /dev/null"}
        opts = sm.MineOptions(spec=spec, verify=False, cache_dir=os.path.join(cache, "envs"))
        res = sm.mine(str(repo), str(tmp_path / "t.jsonl"), since=c[2], until=c[3], opts=opts)
        (inst,) = res.instances
        venv = os.path.join(cache, "envs", f"venv-{sm.env_key(spec, 'local')}")
        assert inst["python"] == os.path.join(venv, "bin", "python") and "pip_packages" not in inst
        assert inst["FAIL_TO_PASS"] == ["tests/test_mean.py::test_mean_empty"]
        assert inst["setup_cmds"][0].endswith("&& python -c 'import tinydep' > /dev/null")
        assert os.listdir(os.path.join(cache, "envs")) == [os.path.basename(venv)]
        assert sm.ensure_venv(spec, os.path.join(cache, "envs"), run=None) == inst["python"]
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_swe_mine_help_names_its_options(capsys):
    from kat_jax import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["swe", "mine", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--repo", "--since", "--prs", "--output", "--backend", "--workers", "--spec",
                 "--runs", "--synthesize"):
        assert flag in out


def test_exported_tree_hashes_as_the_sandbox_commits_it(tmp_path):
    from kat_jax.envs.local_sandbox import LocalSandbox

    repo = tmp_path / "r"
    repo.mkdir()
    _git(repo, "init", "-q")
    _commit(repo, "tracked bytecode too", {"a.py": "x = 1\n", "__pycache__/a.cpython-311.pyc": "b",
                                           "b.pyc": "c", "sub/c.txt": "d\n"})
    tree = tmp_path / "tree"
    sm.export_tree(str(repo), "HEAD", str(tree))
    base = sm.baseline_hash(str(tree))
    assert sorted(p.name for p in tree.rglob("*")) == ["a.py", "c.txt", "sub"]
    with LocalSandbox(str(tree)) as sb:
        assert sb.base == base


def test_an_environment_that_cannot_be_built_is_a_clear_error(history, tmp_path, monkeypatch):
    from kat_jax.envs.sandbox import SandboxError

    def fails(spec, cache_dir):
        raise SandboxError("building the environment venv-x: pip install failed: no such package")

    monkeypatch.setattr(sm, "ensure_venv", fails)
    repo, _ = history
    opts = sm.MineOptions(spec={"pip_packages": ["no-such-package-kat"]})
    with pytest.raises(sm.MiningError, match="building the environment"):
        sm.mine(str(repo), str(tmp_path / "t.jsonl"), opts=opts)
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def docker_engine_client():
    """A client of a real Docker engine holding the sandbox image; skips with the reason otherwise
    (`bash scripts/docker_engine.sh` starts one and builds the image, as CI does)."""
    try:
        from docker.errors import DockerException

        import docker
    except ImportError:
        pytest.skip("no docker package: the docker mining test needs the docker extra")
    from kat_jax.envs.docker_sandbox import default_image
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(default_image())
    except DockerException as e:
        pytest.skip(f"no Docker engine with {default_image()!r} ({e}); scripts/docker_engine.sh")
    return client


@pytest.mark.docker_engine
def test_docker_mining_builds_instance_layers_reused_and_removed(history, tmp_path,
                                                                docker_engine_client):
    """Mining with the docker backend: the kept fix gets its own image (base -> environment ->
    instance layers) that its sandboxes start from, with the same F2P/P2P lists as the local
    backend; mining again reuses it; a candidate that is not kept leaves no image; the written
    instance grades gold 1, empty 0 through `env check --backend docker`."""
    from kat_jax import cli
    from kat_jax.envs.docker_sandbox import default_image as ds_default_image

    client = docker_engine_client
    repo, c = history
    before = {t for i in client.images.list(name=sm.DOCKER_INSTANCE_REPO) for t in i.tags}
    out = tmp_path / "d.jsonl"
    # c[3]: the fix (kept); c[4]: no test change; c[5]: gold_breaks_tests (ran, then dropped)
    res = sm.mine(str(repo), str(out), since=c[2], until=c[5],
                  opts=sm.MineOptions(backend="docker", verify=False,
                                      sandbox_kwargs={"client": client}))
    (inst,) = res.instances
    try:
        assert res.stats["kept"] == 1 and res.stats["gold_breaks_tests"] == 1
        assert inst["FAIL_TO_PASS"] == ["tests/test_mean.py::test_mean_empty"]
        assert inst["PASS_TO_PASS"] == ["tests/test_core.py::test_add",
                                        "tests/test_core.py::test_clamp",
                                        "tests/test_mean.py::test_mean_values"]
        assert inst["image"].startswith(sm.DOCKER_INSTANCE_REPO + ":")
        assert inst["workdir"] == "/testbed"
        image = client.images.get(inst["image"])
        assert image.labels["kat_jax.base_commit"] == inst["base_commit"]
        after = {t for i in client.images.list(name=sm.DOCKER_INSTANCE_REPO) for t in i.tags}
        assert after - before == {inst["image"]}          # the dropped candidate's image is gone
        assert json.loads(out.read_text())["image"] == inst["image"]
        # the same instance on the same environment: the tag is reused, not rebuilt
        assert sm.ensure_docker_instance_image(inst, inst["repo_path"], ds_default_image(),
                                               client) == (inst["image"], False)
        assert client.images.get(inst["image"]).id == image.id
        # graded from its own image (nothing copied in): gold 1, empty 0
        assert cli.main(["env", "check", "--env", "swe", "--tasks", str(out),
                         "--backend", "docker"]) == 0
    finally:
        client.images.remove(inst["image"], force=True)

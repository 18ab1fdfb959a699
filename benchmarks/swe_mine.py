"""SWE task mining throughput and filter funnel (kat_jax.envs.swe_mining), JSON out.

    python benchmarks/swe_mine.py [--commits 200] [--workers 2] [--runs 2]
        [--synthesize K --package six==1.16.0] [--out benchmarks/results/swe_mine.json]

1. A generated repository of ``--commits`` commits (a seeded mix: a feature with its test, a fix
   with a one-word message, a message quoting the fix, a refactor, a docs change, a test-only
   change, a change whose new test already passes, a change that breaks an existing test, a flaky
   test) is mined with ``--backend`` (local, default, or docker: every kept instance then has its
   own image, and the instance images are removed at the end) (verification on): instances per
   minute, and for each filter the share of candidates it removed and the share still kept after it.
2. With ``--synthesize K``: the source distribution of ``--package`` (``pip download --no-binary``)
   is unpacked into a fresh git repository (one commit) and K mutation instances are synthesised at
   its HEAD; then `env check` grades each with its gold patch and an empty one: instances produced
   and the gold 1 / empty 0 rate. Needs network for the download; the JSON says when it failed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from kat_jax.envs import swe_mining as sm
from kat_jax.envs.check import check

FLAKY = '''import os


def test_sometimes():
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "kat_flaky_state")
    n = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(n + 1))
    assert n % 2 == 0
'''
KINDS = [("feature", 35), ("short_message", 8), ("leaky_message", 4), ("refactor", 15),
         ("docs", 10), ("tests_only", 10), ("already_passing", 8), ("breaks_test", 5),
         ("flaky", 1), ("feature_plus_docs", 4)]


def _git(repo: str, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
           "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z", "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", "-C", repo, *args],
                   check=True, capture_output=True, env=env)


def _write(repo: str, path: str, text: str, append: bool = False) -> None:
    full = os.path.join(repo, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "a" if append else "w") as f:
        f.write(text)


def generate_repo(root: str, commits: int, seed: int = 0) -> tuple[str, dict[str, int]]:
    """A package ``gen`` with 10 modules grown by ``commits`` commits of KINDS (seeded)."""
    rng = random.Random(seed)
    repo = os.path.join(root, "gen")
    os.makedirs(repo)
    _git(repo, "init", "-q", "-b", "main")
    _write(repo, "gen/__init__.py", "")
    _write(repo, "tests/__init__.py", "")
    _write(repo, "README.md", "gen\n")
    for m in range(10):
        _write(repo, f"gen/m{m}.py", f"def base{m}(x):\n    return x + {m}\n")
        _write(repo, f"tests/test_base{m}.py",
               f"from gen.m{m} import base{m}\n\n\ndef test_base{m}():\n"
               f"    assert base{m}(1) == {1 + m}\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "Initial package")
    made: dict[str, int] = {}
    names, weights = zip(*KINDS)
    flaky_done = False
    for i in range(1, commits):
        kind = rng.choices(names, weights)[0]
        if kind == "flaky" and flaky_done:
            kind = "refactor"
        m = rng.randrange(10)
        fn = f"feat{i}"
        body = f"\n\ndef {fn}(x):\n    return x * {i % 7 + 2}\n"
        test = (f"from gen.m{m} import {fn}\n\n\ndef test_{fn}():\n"
                f"    assert {fn}(3) == {3 * (i % 7 + 2)}\n\n\ndef test_{fn}_zero():\n"
                f"    assert {fn}(0) == 0\n")
        msg = (f"Add {fn} to gen.m{m}: it scales its argument by {i % 7 + 2}, which the report "
               f"asked for in order to normalise the inputs")
        if kind in ("feature", "short_message", "leaky_message", "feature_plus_docs"):
            _write(repo, f"gen/m{m}.py", body, append=True)
            _write(repo, f"tests/test_{fn}.py", test)
            if kind == "feature_plus_docs":
                _write(repo, "README.md", f"- {fn}\n", append=True)
            if kind == "short_message":
                msg = "fix"
            elif kind == "leaky_message":
                msg += f"\n\nThe fix is:\n    return x * {i % 7 + 2}\n"
        elif kind == "refactor":
            _write(repo, f"gen/m{m}.py", f"\n# refactor {i}\n", append=True)
            msg = f"Refactor gen.m{m} (step {i}) without any change of behaviour at all"
        elif kind == "docs":
            _write(repo, "README.md", f"note {i}\n", append=True)
            msg = f"Document step {i} of the package in the readme for new readers"
        elif kind == "tests_only":
            _write(repo, f"tests/test_more{i}.py", f"from gen.m{m} import base{m}\n\n\n"
                   f"def test_more{i}():\n    assert base{m}(0) == {m}\n")
            msg = f"Test base{m} at zero as well, a case that had no coverage so far"
        elif kind == "already_passing":
            _write(repo, f"gen/m{m}.py", f"\n# note {i}\n", append=True)
            _write(repo, f"tests/test_again{i}.py", f"from gen.m{m} import base{m}\n\n\n"
                   f"def test_again{i}():\n    assert base{m}(2) == {2 + m}\n")
            msg = f"Comment gen.m{m} and test base{m} at two, which already worked before"
        elif kind == "breaks_test":
            _write(repo, f"gen/m{m}.py", f"\n\ndef base{m}(x):\n    return x + {m} + 1\n",
                   append=True)
            _write(repo, f"tests/test_{fn}.py", test.replace(f"gen.m{m} import {fn}",
                                                             f"gen.m{m} import {fn}  # noqa"))
            _write(repo, f"gen/m{m}.py", body, append=True)
            msg += " (and shifts base by one, which breaks its old test)"
        elif kind == "flaky":
            _write(repo, "tests/test_flaky.py", FLAKY)
            msg = "Add a test whose outcome depends on how often it has run"
            flaky_done = True
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", msg)
        made[kind] = made.get(kind, 0) + 1
    return repo, made


def funnel(stats: dict[str, int]) -> list[dict[str, float | str]]:
    """Per filter in order: candidates it removed, and the share still kept after it."""
    n = stats.get("candidates", 0) or 1
    left, rows = n, []
    for f in sm.FILTERS:
        removed = stats.get(f, 0)
        left -= removed
        rows.append({"filter": f, "removed": removed, "removed_share": round(removed / n, 3),
                     "kept_share_after": round(left / n, 3)})
    return rows


def bench_history(args: argparse.Namespace, tmp: str) -> dict:
    t = time.monotonic()
    repo, made = generate_repo(tmp, args.commits, args.seed)
    gen_s = time.monotonic() - t
    opts = sm.MineOptions(workers=args.workers, runs=args.runs, verify=not args.no_verify,
                          backend=args.backend)
    t = time.monotonic()
    res = sm.mine(repo, os.path.join(tmp, "hist.jsonl"), opts=opts)
    secs = time.monotonic() - t
    stats = dict(res.stats)
    images = sorted({i["image"] for i in res.instances if i.get("image")})
    if images:
        import docker

        client = docker.from_env()
        for tag in images:
            client.images.remove(tag, force=True)
    return {"backend": args.backend, "instance_images": len(images), "commits": args.commits,
            "commit_kinds": made, "generate_seconds": round(gen_s, 1),
            "mine_seconds": round(secs, 1), "instances": len(res.instances),
            "instances_per_minute": round(60 * len(res.instances) / secs, 2),
            "candidates_per_minute": round(60 * stats.get("candidates", 0) / secs, 2),
            "stats": stats, "funnel": funnel(stats),
            "kept_share": round(len(res.instances) / max(stats.get("candidates", 1), 1), 3)}


def bench_synthesis(args: argparse.Namespace, tmp: str) -> dict:
    dl = os.path.join(tmp, "sdist")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", args.package, "-d", dl], capture_output=True, text=True)
    archives = glob.glob(os.path.join(dl, "*.tar.gz"))
    if r.returncode != 0 or not archives:
        return {"package": args.package, "error": f"pip download failed: {r.stderr[-500:]}"}
    src = os.path.join(tmp, "pkg")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(src, filter="data")
    (top,) = os.listdir(src)
    repo = os.path.join(tmp, "pkgrepo")
    shutil.move(os.path.join(src, top), repo)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", f"{top} from its source distribution")
    out = os.path.join(tmp, "synth.jsonl")
    opts = sm.MineOptions(workers=args.workers, runs=args.runs, verify=False,
                          repo_name=f"pypi/{top}")
    t = time.monotonic()
    res = sm.mine(repo, out, since="HEAD", synthesize=args.synthesize, opts=opts,
                  seed=args.seed)
    secs = time.monotonic() - t
    rows = check("swe", out, workers=args.workers) if res.instances else []
    good = sum(r["gold"] == 1.0 and r["empty"] == 0.0 for r in rows)
    return {"package": args.package, "sdist": os.path.basename(archives[0]),
            "synthesize": args.synthesize, "synth_seconds": round(secs, 1),
            "instances": len(res.instances), "stats": dict(res.stats),
            "gold1_empty0": good, "gold1_empty0_rate": round(good / len(rows), 3) if rows else None,
            "check_seconds": round(sum(r["seconds"] for r in rows), 1),
            "kinds": sorted(i["mined"]["kind"] for i in res.instances),
            "broken": [r["reason"] for r in rows if not r["ok"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--commits", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--backend", choices=["local", "docker"], default="local")
    ap.add_argument("--synthesize", type=int, default=0)
    ap.add_argument("--package", default="six==1.16.0")
    ap.add_argument("--skip-history", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/swe_mine.json")
    args = ap.parse_args()
    result = {"host": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
              "workers": args.workers, "runs": args.runs}
    tmp = tempfile.mkdtemp(prefix="kat-swe-mine-bench-")
    try:
        if not args.skip_history:
            result["history"] = bench_history(args, tmp)
        if args.synthesize:
            result["synthesis"] = bench_synthesis(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

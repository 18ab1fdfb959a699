"""Writes the bundled SWE instances: tiny Python repositories with a planted bug, an issue and tests.

Output: kat_jax/assets/swe/repos/<name>/ (the code at base_commit, visible tests included) and
kat_jax/assets/swe/instances.jsonl (SWE-bench fields; ``patch`` is the gold fix, ``test_patch`` adds the
hidden tests). ``base_commit`` is the hash the local sandbox gets when it commits the directory as its
baseline (fixed author and dates), so a changed tree is detected. Run from the repository root:

    python scripts/make_swe_instances.py [--check]

``--check`` then grades every instance: the gold patch must resolve it and an empty patch must not.
Tests are unittest classes with pytest-style ids, so they run with or without pytest in the sandbox.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "kat_jax", "assets", "swe")
GIT = ["git", "-c", "user.name=kat", "-c", "user.email=kat@localhost", "-c", "safe.directory=*"]
DATES = {"GIT_AUTHOR_DATE": "2000-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z"}


def d(s: str) -> str:
    return textwrap.dedent(s).lstrip("\n")


REPOS = [
    dict(
        name="statskit", issue=d("""
            `median` returns the wrong value for lists with an even number of elements

            ```python
            >>> from statskit import median
            >>> median([1, 2, 3, 4])
            3
            ```
            The median of an even-length list is the mean of the two middle values, so this should
            return `2.5`. Odd-length lists work fine.
            """),
        files={
            "statskit/__init__.py": "from statskit.core import mean, median, mode\n\n"
                                    "__all__ = [\"mean\", \"median\", \"mode\"]\n",
            "statskit/core.py": d('''
                """Small descriptive statistics."""


                def mean(xs):
                    if not xs:
                        raise ValueError("mean of an empty list")
                    return sum(xs) / len(xs)


                def median(xs):
                    if not xs:
                        raise ValueError("median of an empty list")
                    s = sorted(xs)
                    n = len(s)
                    return s[n // 2]


                def mode(xs):
                    counts = {}
                    for x in xs:
                        counts[x] = counts.get(x, 0) + 1
                    return max(counts, key=lambda k: (counts[k], -xs.index(k)))
                '''),
            "tests/__init__.py": "",
            "tests/test_core.py": d('''
                import unittest

                from statskit import mean, median, mode


                class TestStats(unittest.TestCase):
                    def test_mean(self):
                        self.assertEqual(mean([1, 2, 3]), 2)

                    def test_median_odd(self):
                        self.assertEqual(median([3, 1, 2]), 2)

                    def test_mode(self):
                        self.assertEqual(mode([1, 2, 2, 3]), 2)
                '''),
        },
        fix={"statskit/core.py": ("    return s[n // 2]\n",
                                  "    if n % 2 == 0:\n        return (s[n // 2 - 1] + s[n // 2]) / 2\n"
                                  "    return s[n // 2]\n")},
        hidden={"tests/test_median_even.py": d('''
            import unittest

            from statskit import median


            class TestMedianEven(unittest.TestCase):
                def test_even_length(self):
                    self.assertEqual(median([1, 2, 3, 4]), 2.5)

                def test_even_unsorted(self):
                    self.assertEqual(median([10, 0, 4, 6]), 5)
            ''')},
        f2p=["tests/test_median_even.py::TestMedianEven::test_even_length",
             "tests/test_median_even.py::TestMedianEven::test_even_unsorted"],
        p2p=["tests/test_core.py::TestStats::test_mean",
             "tests/test_core.py::TestStats::test_median_odd",
             "tests/test_core.py::TestStats::test_mode"],
    ),
    dict(
        name="slugger", issue=d("""
            slugify leaves repeated and trailing dashes

            `slugify("  Hello,  World! ")` gives `"--hello---world--"`. A slug should join the words
            with single dashes and have no leading or trailing dash: `"hello-world"`.
            """),
        files={
            "slugger/__init__.py": "from slugger.text import slugify\n",
            "slugger/text.py": d('''
                """URL slugs."""


                def slugify(text):
                    out = []
                    for ch in text.lower():
                        out.append(ch if ch.isalnum() else "-")
                    return "".join(out)
                '''),
            "tests/__init__.py": "",
            "tests/test_text.py": d('''
                import unittest

                from slugger import slugify


                class TestSlugify(unittest.TestCase):
                    def test_single_word(self):
                        self.assertEqual(slugify("Hello"), "hello")

                    def test_two_words(self):
                        self.assertEqual(slugify("Hello World"), "hello-world")
                '''),
        },
        fix={"slugger/text.py": ('    return "".join(out)\n',
                                 '    return "-".join(p for p in "".join(out).split("-") if p)\n')},
        hidden={"tests/test_slug_dashes.py": d('''
            import unittest

            from slugger import slugify


            class TestDashes(unittest.TestCase):
                def test_collapse_and_strip(self):
                    self.assertEqual(slugify("  Hello,  World! "), "hello-world")

                def test_existing_dashes(self):
                    self.assertEqual(slugify("a--b"), "a-b")
            ''')},
        f2p=["tests/test_slug_dashes.py::TestDashes::test_collapse_and_strip",
             "tests/test_slug_dashes.py::TestDashes::test_existing_dashes"],
        p2p=["tests/test_text.py::TestSlugify::test_single_word",
             "tests/test_text.py::TestSlugify::test_two_words"],
    ),
    dict(
        name="intervals", issue=d("""
            merge() does not merge intervals that touch

            `merge([(1, 2), (2, 3)])` returns `[(1, 2), (2, 3)]`, but closed intervals that share an
            endpoint overlap and should become `[(1, 3)]`.
            """),
        files={
            "intervals/__init__.py": "from intervals.ops import merge, total_length\n",
            "intervals/ops.py": d('''
                """Operations on closed intervals (start, end)."""


                def merge(intervals):
                    out = []
                    for start, end in sorted(intervals):
                        if out and start < out[-1][1]:
                            out[-1] = (out[-1][0], max(out[-1][1], end))
                        else:
                            out.append((start, end))
                    return out


                def total_length(intervals):
                    return sum(end - start for start, end in merge(intervals))
                '''),
            "tests/__init__.py": "",
            "tests/test_ops.py": d('''
                import unittest

                from intervals import merge, total_length


                class TestMerge(unittest.TestCase):
                    def test_overlapping(self):
                        self.assertEqual(merge([(1, 4), (2, 5)]), [(1, 5)])

                    def test_disjoint(self):
                        self.assertEqual(merge([(5, 6), (1, 2)]), [(1, 2), (5, 6)])

                    def test_total_length(self):
                        self.assertEqual(total_length([(0, 2), (1, 3), (10, 11)]), 4)
                '''),
        },
        fix={"intervals/ops.py": ("start < out[-1][1]", "start <= out[-1][1]")},
        hidden={"tests/test_touching.py": d('''
            import unittest

            from intervals import merge


            class TestTouching(unittest.TestCase):
                def test_touching_merge(self):
                    self.assertEqual(merge([(1, 2), (2, 3)]), [(1, 3)])

                def test_chain(self):
                    self.assertEqual(merge([(3, 4), (1, 2), (2, 3)]), [(1, 4)])
            ''')},
        f2p=["tests/test_touching.py::TestTouching::test_touching_merge",
             "tests/test_touching.py::TestTouching::test_chain"],
        p2p=["tests/test_ops.py::TestMerge::test_overlapping",
             "tests/test_ops.py::TestMerge::test_disjoint",
             "tests/test_ops.py::TestMerge::test_total_length"],
    ),
    dict(
        name="romanum", issue=d("""
            to_roman(4) returns "IIII"

            Roman numerals use subtractive notation: 4 is `IV`, 9 is `IX`, 40 is `XL`, 90 is `XC`, 400 is
            `CD` and 900 is `CM`. `to_roman(1994)` should be `"MCMXCIV"`, but we get `"MDCCCCLXXXXIIII"`.
            `from_roman` already understands subtractive notation.
            """),
        files={
            "romanum/__init__.py": "from romanum.convert import from_roman, to_roman\n",
            "romanum/convert.py": d('''
                """Roman numerals."""

                VALUES = [(1000, "M"), (500, "D"), (100, "C"), (50, "L"), (10, "X"), (5, "V"), (1, "I")]
                DIGITS = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}


                def to_roman(n):
                    if not 0 < n < 4000:
                        raise ValueError("out of range")
                    out = []
                    for value, sym in VALUES:
                        while n >= value:
                            out.append(sym)
                            n -= value
                    return "".join(out)


                def from_roman(s):
                    total = 0
                    for i, ch in enumerate(s):
                        v = DIGITS[ch]
                        if i + 1 < len(s) and DIGITS[s[i + 1]] > v:
                            total -= v
                        else:
                            total += v
                    return total
                '''),
            "tests/__init__.py": "",
            "tests/test_convert.py": d('''
                import unittest

                from romanum import from_roman, to_roman


                class TestRoman(unittest.TestCase):
                    def test_additive(self):
                        self.assertEqual(to_roman(8), "VIII")
                        self.assertEqual(to_roman(2000), "MM")

                    def test_from_roman(self):
                        self.assertEqual(from_roman("MCMXCIV"), 1994)
                '''),
        },
        fix={"romanum/convert.py": (
            'VALUES = [(1000, "M"), (500, "D"), (100, "C"), (50, "L"), (10, "X"), (5, "V"), (1, "I")]\n',
            'VALUES = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),\n'
            '          (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]\n')},
        hidden={"tests/test_subtractive.py": d('''
            import unittest

            from romanum import from_roman, to_roman


            class TestSubtractive(unittest.TestCase):
                def test_small(self):
                    self.assertEqual(to_roman(4), "IV")
                    self.assertEqual(to_roman(9), "IX")

                def test_1994(self):
                    self.assertEqual(to_roman(1994), "MCMXCIV")

                def test_round_trip(self):
                    for n in range(1, 400):
                        self.assertEqual(from_roman(to_roman(n)), n)
            ''')},
        f2p=["tests/test_subtractive.py::TestSubtractive::test_small",
             "tests/test_subtractive.py::TestSubtractive::test_1994"],
        p2p=["tests/test_convert.py::TestRoman::test_additive",
             "tests/test_convert.py::TestRoman::test_from_roman",
             "tests/test_subtractive.py::TestSubtractive::test_round_trip"],
    ),
    dict(
        name="invoice", issue=d("""
            Adding the same item twice to a Cart loses the first quantity

            ```python
            cart = Cart()
            cart.add("apple", 0.5, 2)
            cart.add("apple", 0.5, 3)
            cart.total()   # 1.5, expected 2.5
            ```
            Quantities of an item added several times should add up.
            """),
        files={
            "invoice/__init__.py": "from invoice.cart import Cart\n",
            "invoice/cart.py": d('''
                """A shopping cart."""


                class Cart:
                    def __init__(self):
                        self.items = {}

                    def add(self, name, price, qty=1):
                        if qty <= 0:
                            raise ValueError("quantity must be positive")
                        self.items[name] = (price, qty)

                    def quantity(self, name):
                        return self.items.get(name, (0, 0))[1]

                    def total(self, discount_percent=0):
                        subtotal = sum(price * qty for price, qty in self.items.values())
                        return round(subtotal * (1 - discount_percent / 100), 2)
                '''),
            "invoice/format.py": d('''
                """Text rendering of a cart."""


                def render(cart):
                    items = sorted(cart.items.items())
                    lines = [f"{name} x{qty} @ {price:.2f}" for name, (price, qty) in items]
                    lines.append(f"total {cart.total():.2f}")
                    return "\\n".join(lines)
                '''),
            "tests/__init__.py": "",
            "tests/test_cart.py": d('''
                import unittest

                from invoice import Cart
                from invoice.format import render


                class TestCart(unittest.TestCase):
                    def test_total(self):
                        c = Cart()
                        c.add("pen", 1.25, 4)
                        c.add("book", 10.0)
                        self.assertEqual(c.total(), 15.0)

                    def test_discount(self):
                        c = Cart()
                        c.add("pen", 2.0, 5)
                        self.assertEqual(c.total(discount_percent=10), 9.0)

                    def test_render(self):
                        c = Cart()
                        c.add("pen", 2.0, 2)
                        self.assertEqual(render(c), "pen x2 @ 2.00\\ntotal 4.00")
                '''),
        },
        fix={"invoice/cart.py": ("        self.items[name] = (price, qty)\n",
                                 "        self.items[name] = (price, self.quantity(name) + qty)\n")},
        hidden={"tests/test_cart_repeat.py": d('''
            import unittest

            from invoice import Cart


            class TestRepeat(unittest.TestCase):
                def test_quantities_add_up(self):
                    c = Cart()
                    c.add("apple", 0.5, 2)
                    c.add("apple", 0.5, 3)
                    self.assertEqual(c.quantity("apple"), 5)
                    self.assertEqual(c.total(), 2.5)
            ''')},
        f2p=["tests/test_cart_repeat.py::TestRepeat::test_quantities_add_up"],
        p2p=["tests/test_cart.py::TestCart::test_total", "tests/test_cart.py::TestCart::test_discount",
             "tests/test_cart.py::TestCart::test_render"],
    ),
]


def git(cwd: str, *args: str, env: dict | None = None) -> str:
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}).stdout


def write_tree(root: str, files: dict[str, str]) -> None:
    for path, text in files.items():
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)


def build(spec: dict) -> dict:
    tmp = tempfile.mkdtemp()
    try:
        write_tree(tmp, spec["files"])
        git(tmp, "init", "-q")
        git(tmp, "add", "-A")
        git(tmp, "commit", "-q", "--allow-empty", "-m", "baseline", env=DATES)
        base = git(tmp, "rev-parse", "HEAD").strip()
        for path, (old, new) in spec["fix"].items():
            text = spec["files"][path]
            assert text.count(old) == 1, (spec["name"], path, old)
            write_tree(tmp, {path: text.replace(old, new)})
        patch = git(tmp, "diff")
        git(tmp, "checkout", "-q", "--", ".")
        write_tree(tmp, spec["hidden"])
        git(tmp, "add", "-A")
        test_patch = git(tmp, "diff", "--cached")
    finally:
        shutil.rmtree(tmp)
    name = spec["name"]
    return {"repo": f"kat-jax/{name}", "instance_id": f"kat-jax__{name}-1", "base_commit": base,
            "problem_statement": spec["issue"], "patch": patch, "test_patch": test_patch,
            "FAIL_TO_PASS": json.dumps(spec["f2p"]), "PASS_TO_PASS": json.dumps(spec["p2p"]),
            "version": "0.1", "repo_path": f"repos/{name}",
            "test_env": {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--check", action="store_true", help="grade gold and empty patches afterwards")
    args = ap.parse_args()
    repos = os.path.join(args.out, "repos")
    shutil.rmtree(repos, ignore_errors=True)
    rows = []
    for spec in REPOS:
        write_tree(os.path.join(repos, spec["name"]), spec["files"])
        rows.append(build(spec))
    with open(os.path.join(args.out, "instances.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(args.out, "conftest.py"), "w") as f:
        f.write("# The bundled repositories' tests run inside sandboxes, not in this project's suite.\n"
                "collect_ignore_glob = [\"*\"]\n")
    print(f"wrote {len(rows)} instances to {args.out}")
    if args.check:
        sys.path.insert(0, ROOT)
        from kat_jax.cli import main as cli_main

        return cli_main(["env", "check", "--env", "swe", "--tasks",
                         os.path.join(args.out, "instances.jsonl")])
    return 0


if __name__ == "__main__":
    sys.exit(main())

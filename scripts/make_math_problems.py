"""Writes the bundled maths problem set (kat_jax/assets/maths/problems.jsonl): 120 generated problems.

Each line is ``{"id", "question", "answer", "metadata": {"kind"}}``; answers are integers, terminating
decimals or fractions in lowest terms, graded by kat_jax.envs.answers. Reproducible (fixed seed):

    python scripts/make_math_problems.py
"""

from __future__ import annotations

import json
import math
import os
import random
from fractions import Fraction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "kat_jax", "assets", "maths", "problems.jsonl")


def fmt(x: Fraction) -> str:
    """An integer, a terminating decimal, or a/b."""
    if x.denominator == 1:
        return str(x.numerator)
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d == 1:
        s = f"{float(x):.10f}".rstrip("0").rstrip(".")
        if Fraction(s) == x:
            return s
    return f"{x.numerator}/{x.denominator}"


def linear(rng: random.Random) -> tuple[str, Fraction]:
    a, x = rng.randint(2, 12), Fraction(rng.randint(-20, 20))
    b = rng.randint(-30, 30)
    return f"Solve for x: {a}x {'+' if b >= 0 else '-'} {abs(b)} = {a * x + b}.", x


def fraction_sum(rng: random.Random) -> tuple[str, Fraction]:
    a, b = Fraction(rng.randint(1, 9), rng.randint(2, 9)), Fraction(rng.randint(1, 9), rng.randint(2, 9))
    op = rng.choice(["+", "-", "\\times"])
    val = a + b if op == "+" else a - b if op == "-" else a * b
    return (f"Compute $\\frac{{{a.numerator}}}{{{a.denominator}}} {op} "
            f"\\frac{{{b.numerator}}}{{{b.denominator}}}$ in lowest terms.", val)


def percent(rng: random.Random) -> tuple[str, Fraction]:
    p, n = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 75]), rng.randint(2, 80) * 10
    return f"What is {p}% of {n}?", Fraction(p * n, 100)


def gcd_lcm(rng: random.Random) -> tuple[str, Fraction]:
    g = rng.randint(2, 15)
    a, b = g * rng.randint(2, 12), g * rng.randint(2, 12)
    if rng.random() < 0.5:
        return f"What is the greatest common divisor of {a} and {b}?", Fraction(math.gcd(a, b))
    return f"What is the least common multiple of {a} and {b}?", Fraction(a * b // math.gcd(a, b))


def series(rng: random.Random) -> tuple[str, Fraction]:
    n = rng.randint(10, 200)
    if rng.random() < 0.5:
        return f"What is the sum of the integers from 1 to {n}?", Fraction(n * (n + 1) // 2)
    return f"What is the sum of the first {n} odd positive integers?", Fraction(n * n)


def mean(rng: random.Random) -> tuple[str, Fraction]:
    xs = [rng.randint(1, 50) for _ in range(rng.randint(3, 6))]
    return f"What is the mean of {', '.join(map(str, xs))}?", Fraction(sum(xs), len(xs))


def geometry(rng: random.Random) -> tuple[str, Fraction]:
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    if rng.random() < 0.5:
        return f"A right triangle has legs {a} and {b}. What is its area?", Fraction(a * b, 2)
    return f"A rectangle is {a} by {b}. What is its perimeter?", Fraction(2 * (a + b))


def power(rng: random.Random) -> tuple[str, Fraction]:
    b, e = rng.randint(2, 9), rng.randint(2, 6)
    return f"What is ${b}^{{{e}}}$?", Fraction(b ** e)


KINDS = [linear, fraction_sum, percent, gcd_lcm, series, mean, geometry, power]


def main() -> None:
    rng = random.Random(20240601)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    seen, rows = set(), []
    while len(rows) < 120:
        kind = KINDS[len(rows) % len(KINDS)]
        q, a = kind(rng)
        if q in seen:
            continue
        seen.add(q)
        rows.append({"id": f"maths-{len(rows):03d}", "question": q, "answer": fmt(a),
                     "metadata": {"kind": kind.__name__}})
    with open(OUT, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(rows)} problems to {OUT}")


if __name__ == "__main__":
    main()

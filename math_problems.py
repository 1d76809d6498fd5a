"""
math_problems.py: the math domain of prepare.py --corpus=claims: problems with their worked answers, from a seeded
generator of our own, pure Python and deterministic for a seed (DeepMind's mathematics-dataset 1.0.1 does not import
with the sympy >= 1.13 that torch needs).

    import random; from math_problems import math_problem, math_document
    print(math_problem(random.Random(0)))      # "Problem: ...", the worked steps, "Answer: ..."
    math_document(seed=0, split="train", k=7)  # document 7 of train: PROBLEMS_PER_DOCUMENT problems, as bytes

One function per kind of problem (MATH_KINDS), each rng -> (question, worked steps, answer): column addition and
subtraction with carries and borrows, long multiplication and division, fractions, percentages, the order of
operations, gcd / lcm by Euclid's algorithm, prime factors, linear equations, expanding and evaluating polynomials,
derivatives of polynomials. Every step that is plain arithmetic is a chain "a = b = c" (with ": why" after it), so
test_all.py checks each such step as well as each answer, computing them on its own.
"""
import random
from fractions import Fraction
from math import gcd

MATH_VERSION = 1  # bump when a problem kind changes its text for the same seed
PROBLEMS_PER_DOCUMENT = 32  # a document (one end-of-text token after it) is a worksheet of this many problems


def number(v):
    """An exact number as the steps write it: 7, -7, 3/4, -3/4."""
    if isinstance(v, int):
        return str(v)
    v = Fraction(v)
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def paren(v):
    """A number inside a product or a power: negatives and fractions in parentheses, "(-2)", "(3/4)"."""
    s = number(v)
    return f"({s})" if s.startswith("-") or "/" in s else s


def signed_sum(values):
    """[12, -4, 5] -> "12 - 4 + 5"."""
    out = number(values[0])
    for v in values[1:]:
        out += f" - {number(-v)}" if v < 0 else f" + {number(v)}"
    return out


def monomial(c, k):
    """c x^k -> "3x^2", "-x", "x", "5", with c an int or a Fraction (a fraction's coefficient as "(3/4)x")."""
    if k == 0:
        return number(c)
    power = "x" if k == 1 else f"x^{k}"
    if c == 1:
        return power
    if c == -1:
        return "-" + power
    s = number(c)
    return (f"({s})" if "/" in s else s) + power


def polynomial(coeffs):
    """Coefficients, lowest degree first -> "3x^2 - 2x + 5" ("0" when all are zero)."""
    terms = [monomial(c, k) for k, c in reversed(list(enumerate(coeffs))) if c != 0]
    if not terms:
        return "0"
    out = terms[0]
    for t in terms[1:]:
        out += f" - {t[1:]}" if t.startswith("-") else f" + {t}"
    return out


def poly_mul(p, q):
    out = [0] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            out[i + j] += a * b
    return out


def nonzero(rng, lo, hi):
    """An integer in [lo, hi] other than 0 (lo < 0 < hi), all equally likely."""
    v = rng.randint(lo, hi - 1)
    return v + 1 if v >= 0 else v


def digits_number(rng, lo, hi):
    """A number of lo to hi digits, its length drawn first so short and long numbers are equally common."""
    n = rng.randint(lo, hi)
    return rng.randint(10 ** (n - 1), 10 ** n - 1)


def addition(rng):
    """Column addition, units first, with the carries written out."""
    a, b = digits_number(rng, 2, 6), digits_number(rng, 2, 6)
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, carry, width = [], 0, max(len(xs), len(ys))
    for i in range(width):
        terms = [int(s[i]) for s in (xs, ys) if i < len(s)] + ([carry] if carry else [])
        total = sum(terms)
        line = " + ".join(map(str, terms)) + f" = {total}"
        if len(terms) == 1:
            steps.append(f"bring down {total}")
        elif i == width - 1:
            steps.append(f"{line}: write {total}")
        else:
            carry = total // 10
            steps.append(f"{line}: write {total % 10}" + (f", carry {carry}" if carry else ""))
    return f"Compute {a} + {b}.", steps, str(a + b)


def subtraction(rng):
    """Column subtraction, units first, with the borrows written out (the larger number first)."""
    a, b = sorted((digits_number(rng, 2, 6), digits_number(rng, 2, 6)), reverse=True)
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps, borrow = [], 0
    for i in range(len(xs)):
        top, bottom = int(xs[i]), int(ys[i]) if i < len(ys) else 0
        borrow_next = 1 if top - borrow < bottom else 0
        top_ = top + 10 * borrow_next
        if not borrow and not borrow_next and i >= len(ys):
            steps.append(f"bring down {top}")
            continue
        line = f"{top_}" + (f" - {borrow}" if borrow else "") + f" - {bottom} = {top_ - borrow - bottom}"
        steps.append(f"{line}: write {top_ - borrow - bottom}" + (", borrow 1" if borrow_next else ""))
        borrow = borrow_next
    return f"Compute {a} - {b}.", steps, str(a - b)


def multiplication(rng):
    """Long multiplication: one partial product per digit of the second factor, then their sum."""
    a, b = digits_number(rng, 2, 4), digits_number(rng, 1, 3)
    parts = [(int(d) * 10 ** i) for i, d in enumerate(str(b)[::-1]) if d != "0"]
    steps = [f"{a} * {p} = {a * p}" for p in parts]
    if len(parts) > 1:
        steps.append(" + ".join(str(a * p) for p in parts) + f" = {a * b}")
    return f"Compute {a} * {b}.", steps, str(a * b)


def division(rng):
    """Long division with a remainder: bring down one digit at a time, then check q * d + r."""
    d = rng.randint(2, 12) if rng.random() < 0.6 else rng.randint(13, 99)
    n = digits_number(rng, 3, 6)
    steps, rem, q, started = [], 0, 0, False
    for ch in str(n):
        cur = rem * 10 + int(ch)
        q = q * 10 + cur // d
        if cur >= d or started:
            started = True
            steps.append(f"{cur} = {d} * {cur // d} + {cur % d}")
        rem = cur % d
    if not started:
        steps.append(f"{n} = {d} * 0 + {n}")
    steps.append(f"{d} * {q} + {rem} = {n}: check")
    return f"Divide {n} by {d}.", steps, f"{q} remainder {rem}" if rem else str(q)


def fractions(rng):
    """Add, subtract, multiply or divide two fractions, then reduce the result."""
    a, b, c, d = rng.randint(1, 12), rng.randint(2, 12), rng.randint(1, 12), rng.randint(2, 12)
    op = rng.choice("+-*/")
    x, y = Fraction(a, b), Fraction(c, d)
    if op in "+-":
        den = b * d // gcd(b, d)
        num = a * den // b + (c * den // d if op == "+" else -(c * den // d))
        steps = [f"{a}/{b} {op} {c}/{d} = {a * den // b}/{den} {op} {c * den // d}/{den} = {num}/{den}: "
                 f"over the common denominator {den}"]
        raw = (num, den)
        question = f"Compute {a}/{b} {op} {c}/{d}."
    elif op == "*":
        steps = [f"{a}/{b} * {c}/{d} = {a * c}/{b * d}: numerators and denominators multiply"]
        raw = (a * c, b * d)
        question = f"Compute {a}/{b} * {c}/{d}."
    else:
        steps = [f"{a}/{b} / ({c}/{d}) = {a}/{b} * {d}/{c} = {a * d}/{b * c}: dividing multiplies by the reciprocal"]
        raw = (a * d, b * c)
        question = f"Compute {a}/{b} divided by {c}/{d}."
    result = x + y if op == "+" else x - y if op == "-" else x * y if op == "*" else x / y
    g = gcd(*raw)
    if g > 1 and raw[0] != 0:
        steps.append(f"{raw[0]}/{raw[1]} = {number(result)}: divide both by {g}")
    return question, steps, number(result)


def percent(rng):
    """p% of n as p/100 * n."""
    p = rng.choice([1, 2, 5, 10, 12, 15, 20, 25, 30, 40, 45, 50, 60, 75, 80, 90, 125, 150])
    n = rng.randint(1, 60) * rng.choice([1, 4, 5, 10, 20])
    steps = [f"{p}/100 * {n} = {p * n}/100 = {number(Fraction(p * n, 100))}"]
    return f"What is {p}% of {n}?", steps, number(Fraction(p * n, 100))


def order_of_operations(rng):
    """An expression of 3 to 5 integers with + - * and parentheses, reduced one operation at a time:
    the innermost first, products before sums, left to right."""
    def build(n):  # a tree of n leaves: an int, or (op, left, right)
        if n == 1:
            return rng.randint(1, 12)
        k = rng.randint(1, n - 1)
        return (rng.choice("+-*"), build(k), build(n - k))

    def show(t, parent=None, right=False):
        if not isinstance(t, tuple):
            return paren(t) if t < 0 else str(t)
        op, a, b = t
        s = f"{show(a, op)} {op} {show(b, op, True)}"
        loose = parent == "*" and op in "+-" or parent == "-" and right and op in "+-"
        return f"({s})" if loose else s

    def reduce_one(t):  # the first operation whose operands are both numbers: products first, then left to right
        for want in ("*", "+-"):
            found = find(t, want)
            if found is not None:
                return found
        raise AssertionError

    def find(t, ops):
        if not isinstance(t, tuple):
            return None
        op, a, b = t
        if not isinstance(a, tuple) and not isinstance(b, tuple):
            return (a * b if op == "*" else a + b if op == "+" else a - b) if op in ops else None
        for i, child in ((1, a), (2, b)):
            r = find(child, ops)
            if r is not None:
                return tuple(r if j == i else x for j, x in enumerate(t))
        return None

    tree = build(rng.randint(3, 5))
    chain = [show(tree)]
    while isinstance(tree, tuple):
        tree = reduce_one(tree)
        chain.append(show(tree))
    return f"Evaluate {chain[0]}.", [" = ".join(chain)], chain[-1].strip("()")


def gcd_lcm(rng):
    """Euclid's algorithm for the greatest common divisor; the least common multiple from it, half the time."""
    g = rng.randint(1, 30)
    a, b = sorted((g * rng.randint(2, 40), g * rng.randint(2, 40)), reverse=True)
    steps, x, y = [], a, b
    while y:
        steps.append(f"{x} = {x // y} * {y} + {x % y}")
        x, y = y, x % y
    if rng.random() < 0.5:
        return f"Find the greatest common divisor of {a} and {b}.", steps + [f"gcd = {x}"], str(x)
    lcm = a * b // x
    steps.append(f"{a} * {b} / {x} = {a * b} / {x} = {lcm}: the product over the gcd {x}")
    return f"Find the least common multiple of {a} and {b}.", steps, str(lcm)


def prime_factors(rng):
    """Split off the smallest prime again and again."""
    n = 1
    while n < 12:
        n = 1
        for _ in range(rng.randint(2, 6)):
            n *= rng.choice([2, 2, 2, 3, 3, 5, 7, 11, 13, 17])
    steps, m, found = [], n, []
    p = 2
    while m > 1:
        while m % p:
            p += 1
        steps.append(f"{m} = {p} * {m // p}")
        found.append(p)
        m //= p
    answer = " * ".join(f"{q}^{found.count(q)}" if found.count(q) > 1 else str(q) for q in sorted(set(found)))
    return f"Write {n} as a product of primes.", steps, answer


def linear_equation(rng):
    """ax + b = c, or ax + b = cx + d: collect x on the left, numbers on the right, divide."""
    x0 = Fraction(rng.randint(-20, 20)) if rng.random() < 0.75 else Fraction(rng.randint(-40, 40), rng.randint(2, 9))
    a, b = nonzero(rng, -12, 12), rng.randint(-30, 30)
    if rng.random() < 0.5:
        c = 0
    else:
        c = nonzero(rng, -12, 12)
        while c == a:
            c = nonzero(rng, -12, 12)
    d = a * x0 + b - c * x0
    if d.denominator != 1:  # keep the equation's numbers whole: move x0 to the nearest integer-friendly value
        x0 = Fraction(round(x0 * (a - c)), a - c)
        d = a * x0 + b - c * x0
    d = int(d)
    left, right = polynomial([b, a]), polynomial([d, c]) if c else str(d)
    steps = []
    if c:
        steps.append(f"{monomial(a, 1)} - {paren(c)}x = {d} - {paren(b)}: {monomial(-c, 1)} and {-b} to both sides")
        k, rhs = a - c, d - b
        steps.append(f"{monomial(k, 1)} = {d} - {paren(b)} = {rhs}")
    else:
        k, rhs = a, d - b
        if b:
            steps.append(f"{monomial(a, 1)} = {d} - {paren(b)} = {rhs}: {-b} to both sides")
    if k != 1:
        steps.append(f"x = {rhs} / {paren(k)} = {number(Fraction(rhs, k))}: divide both sides by {k}")
    return f"Solve {left} = {right} for x.", steps, f"x = {number(Fraction(rhs, k))}"


def expand(rng):
    """(ax + b)(cx + d), (ax + b)(cx^2 + dx + e) or (ax + b)^2: every product of terms, then like terms collected."""
    p = [rng.randint(-9, 9), nonzero(rng, -5, 5)]
    kind = rng.random()
    q = p if kind < 0.2 else [rng.randint(-9, 9), nonzero(rng, -5, 5)] if kind < 0.7 else \
        [rng.randint(-9, 9), rng.randint(-9, 9), nonzero(rng, -4, 4)]
    question = f"({polynomial(p)})^2" if q is p else f"({polynomial(p)})({polynomial(q)})"
    steps, terms = [], []
    for i in reversed(range(len(p))):
        for j in reversed(range(len(q))):
            if p[i] and q[j]:
                steps.append(f"{wrap(monomial(p[i], i))} * {wrap(monomial(q[j], j))} = {monomial(p[i] * q[j], i + j)}")
                terms.append((p[i] * q[j], i + j))
    result = poly_mul(p, q)
    collected = polynomial([0]) if not terms else signed_terms(terms)
    steps.append(f"{collected} = {polynomial(result)}: like terms collected")
    return f"Expand {question}.", steps, polynomial(result)


def wrap(term):
    return f"({term})" if term.startswith("-") else term


def signed_terms(terms):
    """[(3, 2), (-8, 1), (3, 1)] -> "3x^2 - 8x + 3x", the terms in the order given."""
    out = monomial(*terms[0])
    for c, k in terms[1:]:
        t = monomial(c, k)
        out += f" - {t[1:]}" if t.startswith("-") else f" + {t}"
    return out


def evaluate(rng):
    """A polynomial of degree 2 or 3 at an integer: each term's value, then their sum."""
    coeffs = [rng.randint(-9, 9) for _ in range(rng.randint(2, 3))] + [nonzero(rng, -6, 6)]
    x = rng.randint(-5, 5)
    steps, values = [], []
    for k in reversed(range(len(coeffs))):
        c = coeffs[k]
        if c == 0:
            continue
        v = c * x ** k
        values.append(v)
        if k == 0:
            continue
        power = paren(x) if k == 1 else f"{paren(x)}^{k}"
        steps.append(f"{c} * {power} = {c} * {x ** k} = {v}" if k > 1 else f"{c} * {power} = {v}")
    steps.append(f"{signed_sum(values)} = {sum(values)}")
    return f"Evaluate {polynomial(coeffs)} at x = {x}.", steps, str(sum(values))


def derivative(rng):
    """The power rule term by term: d/dx c x^k = k c x^(k-1)."""
    coeffs = [rng.randint(-9, 9) for _ in range(rng.randint(2, 4))] + [nonzero(rng, -9, 9)]
    steps = []
    for k in reversed(range(len(coeffs))):
        c = coeffs[k]
        if c == 0:
            continue
        rule = f"{k} * {paren(c)}{'x' if k == 2 else f'x^{k - 1}'} = " if k > 1 else ""
        steps.append(f"d/dx {monomial(c, k)} = {rule}{monomial(k * c, k - 1) if k else 0}")
    result = polynomial([k * c for k, c in enumerate(coeffs)][1:])
    return f"Differentiate f(x) = {polynomial(coeffs)}.", steps, f"f'(x) = {result}"


MATH_KINDS = [addition, subtraction, multiplication, division, fractions, percent, order_of_operations, gcd_lcm,
              prime_factors, linear_equation, expand, evaluate, derivative]  # drawn with equal chances


def math_problem(rng):
    """One problem of a kind drawn at random, as text: "Problem: ...", its steps, "Answer: ..."."""
    question, steps, answer = rng.choice(MATH_KINDS)(rng)
    return "\n".join([f"Problem: {question}", *steps, f"Answer: {answer}"]) + "\n"


def math_document(seed, split, k):
    """Document k of a split: PROBLEMS_PER_DOCUMENT problems, a blank line between them. Its own generator, seeded
    by (seed, split, k), so any document can be made alone, and val's ("val") never draw train's numbers."""
    rng = random.Random(f"nanoseek-math-v{MATH_VERSION}:{seed}:{split}:{k}")
    return "\n".join(math_problem(rng) for _ in range(PROBLEMS_PER_DOCUMENT)).encode("utf-8")

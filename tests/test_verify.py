"""Tests of verify.py, the answer checker that is RISE's reward: tricky cases in tables, properties checked by
hypothesis, adversarial inputs against the clock, and every GSM8K / MATH reference solution.

Data: $RISE_DATA_DIR (default ../shared/data next to the repository) holding gsm8k/{train,test}.jsonl and
math/test.jsonl; the tests that need them are skipped, with the path, when they are absent."""

import json
import os
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from verify import (Step, answers_equal, arithmetic_errors, canonical_answer, check_steps,  # noqa: E402
                    extract_answer, is_correct, parse_reference, reward, to_number)

DATA_DIR = Path(os.environ.get("RISE_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
FAST = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


def load_jsonl(relative: str) -> list[dict]:
    path = DATA_DIR / relative
    if not path.exists():
        pytest.skip(f"{path} not found (set RISE_DATA_DIR to the folder holding gsm8k/ and math/)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------
# Tables of tricky cases
# ---------------------------------------------------------------------------------------------------------

EXTRACTION = [  # (response, extract_answer, extract_answer strict)
    ("The answer is 42", "42", "42"),
    ("The answer is: **42**.", "42", "42"),
    ("**Final Answer:** $18.", "18", "18"),
    ("final answer: -3", "-3", "-3"),
    ("So the answer is −3.", "−3", "−3"),
    ("The answer is $1,000.50.", "1,000.50", "1,000.50"),
    ("The answer will be 7 apples", "7", "7"),
    ("Answer:\n\n**18**", "18", "18"),
    ("The answer is \\dfrac{3}{4}.", "\\dfrac{3}{4}", "\\dfrac{3}{4}"),
    ("The answer is $\\boxed{12}$.", "12", "12"),
    ("so \\boxed{\\frac{1}{2}} it is", "\\frac{1}{2}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{x^2+1}.", "x^2+1", "x^2+1"),
    ("She makes 9 * 2 = $18.\n#### 18", "18", "18"),
    ("#### 2,125", "2,125", "2,125"),
    # several answers: the last by position wins, whatever its form
    ("I think 5. Then \\boxed{7}. The answer is 9", "9", "9"),
    ("The answer is 9. Wait, no: \\boxed{7}", "7", "7"),
    ("#### 5\nThe answer is 6", "6", "6"),
    ("The answer is 5\n#### 6", "6", "6"),
    ("\\boxed{1} and then \\boxed{2}", "2", "2"),
    # no explicit answer: the last number, unless strict
    ("She has 16 - 3 - 4 = 9 eggs left", "9", None),
    ("3/4 of the cake, so 12 = 9.", "9", None),
    ("It is 10-3", "3", None),  # "-3" is a subtraction here, not a negative number
    ("The total is -3", "-3", None),
    ("The answers are 3 and 4", "4", None),
    ("\\boxed{}", None, None),  # an empty box is no answer
    ("\\boxed{1", "1", None),  # an unclosed box neither
    ("No numbers here.", None, None),
    ("", None, None),
    ("The answer is 1,5", "1,5", "1,5"),  # extracted as written; it is no number (see COMPARISON)
]


@pytest.mark.parametrize("response, expected, expected_strict", EXTRACTION)
def test_extract_answer(response, expected, expected_strict):
    assert extract_answer(response) == expected
    assert extract_answer(response, strict=True) == expected_strict


COMPARISON = [  # (a, b, equal?)
    ("18.00", "18", True), ("18.", "18", True), ("+5", "5", True), ("0", "-0", True),
    ("0.5", "1/2", True), ("0.5", "\\frac{1}{2}", True), ("\\dfrac{1}{2}", "1/2", True), ("\\tfrac{1}{2}", ".5", True),
    ("\\frac12", "0.5", True), ("-\\frac{1}{2}", "\\frac{-1}{2}", True), ("-1/2", "-0.5", True),
    ("2,125", "2125", True), ("1,000,000", "1000000", True), ("$1,000.50", "1000.5", True), ("\\$18", "18", True),
    ("-$5", "-5", True), ("$-5", "-5", True), ("−3", "-3", True), ("-3", "3", False),
    ("5%", "5", True), ("5\\%", "5", True), ("5%", "0.05", False),  # % is dropped, as GSM8K drops it
    ("18 dollars", "18", True), ("5 cm", "5", True), ("\\text{18 dollars}", "18", True), ("x = 5", "5", True),
    ("0.333", "1/3", False), ("3.14", "22/7", False), ("18", "180", False), ("18", "19", False),
    ("1,5", "15", False), ("1,5", "1.5", False), ("12,34", "1234", False),  # "1,5": no number, never guessed
    ("1,5", "1,5", True),  # ... but the same string
    ("5x", "5", False), ("2 pi", "2", False), ("1 1/2", "1.5", False),  # no mixed numbers in final answers
    ("1/0", "0", False), ("", "", False), ("   ", "   ", False),
    ("x^2+1", "x^2 + 1", True), ("\\left( 1, 2 \\right)", "(1,2)", True), ("\\text{(A)}", "(A)", True),
    ("10,\\!000", "10000", True), ("30^\\circ", "30", True), ("\\boxed{5}", "5", True), ("x^2+1", "x^2-1", False),
    # scientific notation, exactly; with an exponent of over three digits, a string only (as over 1,000 digits)
    ("5e2", "500", True), ("1e309", "1" + "0" * 309, True), ("1e309", "1", False), ("1e309", "1e308", False),
    ("2.5e-3", "1/400", True), ("3E4", "30,000", True), ("-1.5E+2", "-150", True), ("1e1000", "1e1000", True),
    ("1e1000", "1e1001", False),
    # currencies as "$"; Unicode digits as ASCII ones; spaces (thin, no-break too) between groups of three digits
    ("€18", "18", True), ("18€", "$18", True), ("£1,000", "1000", True), ("USD 18", "18", True),
    ("EUR 18", "18 dollars", True), ("18 GBP", "¥18", True), ("€18", "19", False), ("EUROPE", "OPE", False),
    ("４２", "42", True), ("٤٢", "42", True), ("۴۲", "٤٢", True), ("٤٢", "43", False),
    ("1 000", "1,000", True), ("1\u2009000", "1000", True), ("1\u202f000.5", "1000.5", True),
    ("1\u00a0000 000", "1e6", True), ("1 000", "1,001", False),
    # LaTeX's one-digit arguments
    ("\\sqrt5", "\\sqrt{5}", True), ("\\frac{\\sqrt5}{2}", "\\frac{\\sqrt{5}}{2}", True),
    ("2\\sqrt 3", "2\\sqrt{3}", True), ("\\sqrt5", "\\sqrt{50}", False), ("\\frac 54", "1.25", True),
]


@pytest.mark.parametrize("a, b, equal", COMPARISON)
def test_answers_equal(a, b, equal):
    assert answers_equal(a, b) is equal
    assert answers_equal(b, a) is equal


IS_CORRECT = [  # (response, reference, correct?)
    ("The answer is 2125.", "Janet ... so 2,000+125 = <<2000+125=2125>>2,125\n#### 2,125", True),
    ("The answer is $2,125", "2,125", True),
    ("The answer is 2,124", "2,125", False),
    ("So she makes \\boxed{18} dollars.", "#### 18", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("The answer is 0.5", "Hence $p = \\boxed{\\dfrac{1}{2}}$.", True),
    ("The answer is 3, not 5.", "5", False),
    ("Maybe 5? Actually the answer is 6.", "5", False),
    ("I don't know", "5", False),
    ("5 is my guess", "5", True),
]


@pytest.mark.parametrize("response, reference, correct", IS_CORRECT)
def test_is_correct(response, reference, correct):
    assert is_correct(response, reference) is correct


BAD_INPUT = [  # (response, reference, extract_answer, reward): as a careful grader would score them
    # scientific notation: the whole number, exactly (10^309 is no float), and an "e" only before a digit
    ("The answer is 5e2", "500", "5e2", 1.0), ("The answer is 5e2", "5", "5e2", 0.0),
    ("The answer is 1e309", "1" + "0" * 309, "1e309", 1.0), ("The answer is 1e309", "1", "1e309", 0.0),
    ("The answer is 2.5e-3", "0.0025", "2.5e-3", 1.0), ("The answer is 3E4.", "#### 30,000", "3E4", 1.0),
    ("The answer is 5 eggs", "5", "5", 1.0), ("She has 5 eggs", "5", "5", 1.0),
    # the result of a calculation stated as the answer
    ("So the answer is 16 - 3 - 4 = 9 eggs.", "9", "9", 1.0), ("So the answer is 16 - 3 - 4 = 9 eggs.", "16", "9", 0.0),
    ("\\boxed{16-3-4=9}", "9", "9", 1.0), ("The answer is 1.5 + 2 = 3.5", "3.5", "3.5", 1.0),
    ("The answer is (2 + 3) * 4 = $20", "20", "$20", 1.0), ("The answer is -3 + 5 = 2", "2", "2", 1.0),
    ("The answer is $3 \\times 4 = 12$.", "12", "12", 1.0), ("The answer is 2e3 + 5 = 2005", "2005", "2005", 1.0),
    ("The answer is 12. 3 + 4 = 7", "12", "12", 1.0),  # a new sentence is no calculation
    ("\\boxed{x = 5}", "5", "x = 5", 1.0),  # algebra is kept whole
    # hedges: two numbers joined by "or" or "and" are no single answer
    ("The answer is 5 or 6", "5", "5 or 6", 0.0), ("The answer is 5 or 6", "6", "5 or 6", 0.0),
    ("The answer is either 5 or 6.", "5", "5 or 6", 0.0), ("The answer is between 5 and 6", "6", "5 and 6", 0.0),
    ("#### 5 or 6", "5", "5 or 6", 0.0), ("The answer is 5 oranges", "5", "5", 1.0),
    ("The answer is 5/6", "5/6", "5/6", 1.0),  # "/" is a fraction, not a hedge
    # nested boxes
    ("\\boxed{\\boxed{7}}", "7", "7", 1.0), ("\\boxed{\\boxed{\\frac{1}{2}}}", "0.5", "\\frac{1}{2}", 1.0),
    ("The answer is 6.", "\\boxed{\\boxed{7}}", "6", 0.0),
    # currencies, on either side
    ("The answer is €18", "18", "18", 1.0), ("The answer is 18€", "18", "18", 1.0),
    ("The answer is £1,000", "1000", "1,000", 1.0), ("The answer is USD 18", "18", "18", 1.0),
    ("The answer is EUR 18", "18", "18", 1.0), ("The answer is $18", "€18", "18", 1.0),
    ("The answer is 18 dollars", "EUR 18", "18", 1.0), ("The answer is 18", "18 USD", "18", 1.0),
    ("The answer is 18", "£1,000", "18", 0.0),
    # Unicode digits
    ("The answer is ４２", "42", "42", 1.0), ("The answer is ٤٢", "42", "42", 1.0),
    ("The answer is ۴۲", "42", "42", 1.0),
    ("\\boxed{٤٢}", "#### ４２", "42", 1.0), ("The answer is ٤٣", "42", "43", 0.0),
    # thousands separated by spaces, thin spaces, narrow no-break spaces
    ("The answer is 1 000", "1000", "1 000", 1.0), ("The answer is 1\u2009000", "1,000", "1 000", 1.0),
    ("The answer is 1\u202f000 apples", "1000", "1 000", 1.0), ("\\boxed{1 000}", "1,000", "1 000", 1.0),
    ("The answer is 5 600", "5", "5 600", 0.0), ("It is between 3 and 4", "4", "4", 1.0),
    ("The answer is 5 60", "5", "5", 1.0), ("The answer is 1 0000", "1", "1", 1.0),  # only groups of three
    # LaTeX's one-digit arguments
    ("\\boxed{\\sqrt5}", "\\sqrt{5}", "\\sqrt5", 1.0),
    ("\\boxed{\\frac{\\sqrt5}{2}}", "\\frac{\\sqrt{5}}{2}", "\\frac{\\sqrt5}{2}", 1.0),
    ("\\boxed{\\frac12}", "0.5", "\\frac12", 1.0), ("\\boxed{\\sqrt5}", "\\sqrt{6}", "\\sqrt5", 0.0),
]


@pytest.mark.parametrize("response, reference, extracted, score", BAD_INPUT)
def test_bad_input_is_scored_as_a_careful_grader_would(response, reference, extracted, score):
    assert extract_answer(response) == extracted
    assert reward(response, reference) == score


def test_scientific_notation_is_exact():
    assert to_number("1e309") == 10**309 and to_number("2.5e-3") == Fraction(1, 400) and to_number("5E+2") == 500
    assert to_number("1e-999") == Fraction(1, 10**999) and to_number("1e1000") is None  # too long: a string
    assert canonical_answer("5e2") == canonical_answer("500") and canonical_answer("1e309") == str(10**309)


def test_strict_mode_needs_an_explicit_answer():
    assert is_correct("5 is my guess", "5") and not is_correct("5 is my guess", "5", strict=True)
    assert reward("5 is my guess", "5", strict=True) == -1.0


def test_reward_follows_the_official_convention():
    assert reward("The answer is 5", "5") == 1.0
    assert reward("The answer is 6", "5") == 0.0
    assert reward("no idea", "5") == -1.0  # no parsable answer at all
    assert reward("The answer is 5", "") == 0.0  # an unusable reference makes nothing correct


def test_parse_reference():
    assert parse_reference("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 2,125") == "2,125"
    assert parse_reference("so \\boxed{5}, and thus \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert parse_reference("  7 ") == "7"
    assert parse_reference("") is None and parse_reference("#### ") is None


def test_canonical_answer_merges_equal_answers():
    assert canonical_answer("0.5") == canonical_answer("\\frac{1}{2}") == canonical_answer("1/2") == "1/2"
    assert canonical_answer("$2,125.00") == canonical_answer("2125") != canonical_answer("2126")
    assert canonical_answer("x^2 + 1") == canonical_answer("x^2+1")


@pytest.mark.parametrize("bad", [None, True, b"5", ["5"], {"a": 1}])
def test_non_strings_are_a_type_error_that_names_them(bad):
    for call in (lambda: extract_answer(bad), lambda: parse_reference(bad), lambda: to_number(bad),
                 lambda: is_correct(bad, "5"), lambda: is_correct("5", bad), lambda: reward("\\boxed{5}", bad),
                 lambda: answers_equal(bad, "5"), lambda: canonical_answer(bad), lambda: check_steps(bad),
                 lambda: arithmetic_errors(bad)):
        with pytest.raises(TypeError, match=f"not {type(bad).__name__}"):
            call()


@pytest.mark.parametrize("number, right, wrong", [(5, "\\boxed{5}", "\\boxed{6}"), (2.5, "#### 2.50", "#### 2.4"),
                                                  (0.1, "The answer is 1/10", "The answer is 0.1000001"),
                                                  (Fraction(1, 3), "\\boxed{\\frac{1}{3}}", "\\boxed{0.33}"),
                                                  (-7, "#### -7", "#### 7")])
def test_a_number_as_reference_is_that_number(number, right, wrong):
    assert reward(right, number) == 1.0 and is_correct(right, number) and reward(wrong, number) == 0.0
    assert reward(number, number) == 1.0 and answers_equal(number, extract_answer(right))
    with pytest.raises(ValueError, match="not a finite number"):
        reward(right, float("nan"))


def test_control_characters_do_not_make_answers_unequal():
    assert reward("\\boxed{5\x00}", "5") == 1.0 and reward("#### 5\x07", "#### 5") == 1.0
    assert answers_equal("\x00x^2\x1b + 1", "x^2+1") and canonical_answer("1\x00/2") == canonical_answer("0.5")
    assert reward("\\boxed{6\x00}", "5") == 0.0  # and they do not make a wrong answer right


# ---------------------------------------------------------------------------------------------------------
# Arithmetic steps
# ---------------------------------------------------------------------------------------------------------

STEPS = [  # (text, [(expression, stated, ok), ...])
    ("Janet sells 16 - 3 - 4 = 9 duck eggs", [("16 - 3 - 4", "9", True)]),
    ("Janet sells 16 - 3 - 4 = 8 duck eggs", [("16 - 3 - 4", "8", False)]),
    ("She makes <<9*2=18>>18 dollars", [("9*2", "18", True)]),
    ("$80,000 * 1.5 = $120,000", [("$80,000 * 1.5", "$120,000", True)]),
    ("3 × 4 = 12, 3 x 4 = 13 and 12 ÷ 4 = 3",
     [("3 × 4", "12", True), ("3 x 4", "13", False), ("12 ÷ 4", "3", True)]),
    ("(2 + 3) * 4 = 20 and 2(3+4)=14", [("(2 + 3) * 4", "20", True), ("2(3+4)", "14", True)]),
    ("−3 + 5 = 2", [("−3 + 5", "2", True)]),
    ("10/3 = 3.33", [("10/3", "3.33", True)]),  # rounded to the decimals shown
    ("10/3 = 3.34", [("10/3", "3.34", False)]),
    ("7/2 = 4 buses", [("7/2", "4", True)]),  # rounding to a whole number is rounding too
    ("1.5 + 1.5 = 3.0", [("1.5 + 1.5", "3.0", True)]),
    ("20/40*100 = 50%", [("20/40*100", "50%", True)]),
    ("50% * 80 = 40", [("50% * 80", "40", True)]),
    ("2^10 = 1024", [("2^10", "1024", True)]),
    ("5/0 = 0", [("5/0", "0", False)]),
    ("3 \\times 4 = 12 and \\frac{3}{4} \\times 8 = 6", [("3 × 4", "12", True), ("((3)/(4)) × 8", "6", True)]),
    ("(3+4)*2 = 7*2 = 14", [("(3+4)*2", "7*2", True), ("7*2", "14", True)]),
    ("5 + 3 = 8 + 2 = 10", [("5 + 3", "8 + 2", True), ("8 + 2", "10", True)]),  # sloppy chain: 5 + 3 = 8
    ("5 + 3 = 9 + 2 = 11", [("5 + 3", "9 + 2", False), ("9 + 2", "11", True)]),
    ("6/2 = 3/5", [("6/2", "3/5", False)]),
    ("17/3 = 5 and 2/3 loads", [("17/3", "(5+2/3)", True)]),
    ("25 / 1/3 = 75", [("25 / 1/3", "75", True)]),  # dividing by the fraction 1/3
    ("<<560//10=56>>", [("560//10", "56", True)]),  # Python floor division, as in GSM8K's calculator
    # not calculations: no operator, a word operand, algebra, clock times
    ("x = 5, so 12 = 12", []), ("He works M + 4 + 2 = 8 hours", []), ("3*30 = 30 + M", []),
    ("8/3 = 24/Y", []), ("2x + 3 = 7", []), ("from 0900-0130 = 0730", []), ("a <= 5", []),
]


@pytest.mark.parametrize("text, expected", STEPS)
def test_check_steps(text, expected):
    steps = check_steps(text)
    assert [(s.expression, s.stated, s.ok) for s in steps] == expected
    assert arithmetic_errors(text) == [s for s in steps if not s.ok]


def test_step_record():
    (step,) = check_steps("16 - 3 - 4 = 8")
    assert step == Step(expression="16 - 3 - 4", stated="8", value=Fraction(9), ok=False)


EVALUATION = [  # (text, the values of its steps): precedence, associativity, signs, "%", "//", "(" after a value
    ("2^3^2 = 512", [512]), ("10 - 2 - 3 = 5", [5]), ("12 / 2 / 3 = 2", [2]), ("8 / -2 / 2 = -2", [-2]),
    ("-2^2 = -4", [-4]), ("2^-2 = 0.25", [Fraction(1, 4)]), ("2*-3^2 = -18", [-18]), ("2^-3*4 = 0.5", [Fraction(1, 2)]),
    ("3 * -(2 + 1) = -9", [-9]), ("2(3)^2 = 18", [18]), ("2^3(4) = 32", [32]), ("(2)(3) = 6", [6]),
    ("6 / 2(1 + 2) = 9", [9]), ("2 + 3% = 2.03", [Fraction(203, 100)]), ("50%(4) = 2", [2]),
    ("2%^2 = 0.0004", [Fraction(1, 2500)]), ("7//2*2 = 6", [6]), ("-7//2 = -4", [-4]),
    ("0^-1 = 0", [None]), ("5 // 0 = 0", [None]),  # a division by zero is a wrong step
    ("2^2^-1 = 2", []), ("4 % 2 = 0", []), ("3 4 + 1 = 8", []),  # irrational; "%" is no modulo; "3 4" is no number
]


@pytest.mark.parametrize("text, values", EVALUATION)
def test_evaluation_follows_the_usual_rules(text, values):
    assert [s.value for s in check_steps(text)] == values


# ---------------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------------

def integer_formats(n: int) -> list[str]:
    minus = "-" if n < 0 else ""
    formats = [str(n), f"{n:,}", f"{n}.00", f"{n}.", f"{minus}${abs(n):,}", f"${n}", f"{n} dollars", f"{n:,} cm",
               f"\\${n:,}", f"{n}%", f"\\text{{{n}}}", f"\\frac{{{n}}}{{1}}", f"{2 * n}/2", f"{n}.0000"]
    formats += [f"+{n}", f"+{n:,}"] if n >= 0 else [str(n).replace("-", "−"), f"-{abs(n):,}"]
    formats += [f"{n:,}".replace(",", " "), f"{n:,}".replace(",", "\u202f"), f"{n * 10}e-1", f"{n}E0", f"€{n}",
                f"{n} EUR", str(n).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))]
    return formats


@FAST
@given(st.integers(-10**15, 10**15))
def test_integers_in_any_format(n):
    for text in integer_formats(n):
        assert to_number(text) == n, text
        assert answers_equal(text, str(n)) and answers_equal(text, f"{n:,}"), text
        assert not answers_equal(text, str(n + 1)) and not answers_equal(text, f"{n - 1:,}"), text
        assert is_correct(f"So the answer is {text}.", f"She has 3 + 4 = <<3+4=7>>7.\n#### {n}"), text
        assert is_correct(f"Thus \\boxed{{{text}}}", str(n)), text
        assert not is_correct(f"The answer is: **{text}**", str(n + 1)), text


@FAST
@given(st.integers(-10**9, 10**9), st.integers(1, 10**4))
def test_fractions_in_any_format(p, q):
    value = Fraction(p, q)
    texts = [f"{p}/{q}", f"\\frac{{{p}}}{{{q}}}", f"\\dfrac{{{p}}}{{{q}}}", f"{p} / {q}", f"{p:,}/{q:,}"]
    if p < 0:
        texts.append(f"-\\frac{{{-p}}}{{{q}}}")
    if 10**12 % value.denominator == 0:  # a terminating decimal: write it out, exactly
        digits = str(abs(value.numerator) * (10**12 // value.denominator)).rjust(13, "0")
        texts.append(f"{'-' if value < 0 else ''}{digits[:-12]}.{digits[-12:]}")
    for text in texts:
        assert to_number(text) == value, text
        assert answers_equal(text, f"{p}/{q}") and not answers_equal(text, f"{p + q}/{q}"), text
        assert is_correct(f"The answer is {text}", f"\\boxed{{\\frac{{{p}}}{{{q}}}}}"), text


def _expressions():
    """Random arithmetic with its exact value: (text, Fraction)."""
    leaf = st.integers(-50, 1000).map(lambda n: (f"({n})" if n < 0 else str(n), Fraction(n)))

    def combine(children):
        (a, x), op, (b, y) = children
        if op in "/÷" and y == 0:
            op = "+"
        value = x + y if op == "+" else x - y if op in "-−" else x * y if op in "*×x" else x / y
        return f"({a} {op} {b})", value

    ops = st.sampled_from(["+", "-", "−", "*", "×", "x", "/", "÷"])
    return st.recursive(leaf, lambda kids: st.tuples(kids, ops, kids).map(combine), max_leaves=8)


@FAST
@given(_expressions())
def test_stated_arithmetic_is_checked_exactly(expression):
    text, value = expression
    right = str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    wrong = value + 1
    wrong = str(wrong.numerator) if wrong.denominator == 1 else f"{wrong.numerator}/{wrong.denominator}"
    steps = check_steps(f"We get {text} = {right} apples.")
    if " " not in text:  # a bare number is no calculation
        assert steps == []
        return
    assert [(s.value, s.ok) for s in steps] == [(value, True)]
    assert [(s.value, s.ok) for s in check_steps(f"We get {text} = {wrong} apples.")] == [(value, False)]
    assert [s.ok for s in check_steps(f"<<{text}={right}>>")] == [True]


JUNK = st.lists(st.sampled_from(["\\boxed{", "}", "{", "####", "The answer is", "answer:", "1", "23", ",", ".",
                                 "/", "$", "-", "−", "=", "<<", ">>", "(", ")", "^", "9", " ", "\n", "\\frac", "%",
                                 "x", "×", "**", "\\text{", "0", "\x00", "\ud800", "é"]), max_size=60).map("".join)


def _never_raises(text):
    assert extract_answer(text) is None or isinstance(extract_answer(text), str)
    assert extract_answer(text, strict=True) is None or isinstance(extract_answer(text, strict=True), str)
    assert parse_reference(text) is None or isinstance(parse_reference(text), str)
    assert to_number(text) is None or isinstance(to_number(text), Fraction)
    assert isinstance(is_correct(text, text), bool) and isinstance(is_correct(text, "5"), bool)
    assert isinstance(answers_equal(text, text), bool)
    assert reward(text, "5") in (1.0, 0.0, -1.0)
    assert all(isinstance(s, Step) for s in check_steps(text))
    canonical_answer(text)
    arithmetic_errors(text)
    answer = extract_answer(text)  # an extracted number is always judged equal to itself
    if answer is not None and to_number(answer) is not None:
        assert is_correct(text, answer)


@FAST
@given(st.text())
def test_never_raises_on_any_text(text):
    _never_raises(text)


@FAST
@given(st.binary().map(lambda b: b.decode("latin-1")))
def test_never_raises_on_binary_junk(text):
    _never_raises(text)


@FAST
@given(JUNK)
def test_never_raises_on_answer_like_junk(text):
    _never_raises(text)


# ---------------------------------------------------------------------------------------------------------
# Adversarial inputs, against the clock (each call should take well under 0.5 s; 2 s is the bound)
# ---------------------------------------------------------------------------------------------------------

MILLION_DIGITS = "7" * 10**6
ADVERSARIAL = {
    "1e6 digits": f"The answer is {MILLION_DIGITS}",
    "1e6 digits boxed": f"\\boxed{{{MILLION_DIGITS}}}",
    "9^9^9^9": "9^9^9^9 = 5, so \\boxed{9^9^9^9}",
    "10,000 nested parentheses": "(" * 10_000 + "1 + 2" + ")" * 10_000 + " = 3",
    "1 MB junk": "".join(chr((i * 7919) % 0xD800) for i in range(10**6)),
    "NUL bytes and surrogates": "\x00\ud800\udfff#### 5\x00" * 100_000,
    '"1," * 100000': "1," * 100_000,
    '"{" * 100000': "{" * 100_000,
    '"\\boxed{" * 50000': "\\boxed{" * 50_000,
    '"#### " * 100000': "#### " * 100_000,
    "1 MB of parentheses": "(" * 10**6,
    "1 MB of sums": "1+" * 500_000 + "1 = 2",
    '"%" * 100000': "5" + "%" * 99_990 + " + 1 = 1",  # 5 / 100^99990: too big to check, not slow to find so
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_inputs_in_bounded_time(name):
    text = ADVERSARIAL[name]
    for call in (lambda: extract_answer(text), lambda: is_correct(text, text), lambda: reward(text, "5"),
                 lambda: check_steps(text)):
        start = time.perf_counter()
        call()
        assert time.perf_counter() - start < 2.0, name


def test_adversarial_answers_are_still_right():
    # numbers too long to convert are compared as strings: equal only when identical
    assert extract_answer(ADVERSARIAL["1e6 digits"]) == MILLION_DIGITS and to_number(MILLION_DIGITS) is None
    assert is_correct(ADVERSARIAL["1e6 digits"], MILLION_DIGITS)
    assert not is_correct(ADVERSARIAL["1e6 digits"], MILLION_DIGITS[:-1] + "8")
    assert not answers_equal(MILLION_DIGITS, MILLION_DIGITS + "0")
    assert check_steps("9^9^9^9 = 5") == [] and check_steps("2^-2 = 0.25")[0].ok  # too big to check: no step
    assert check_steps(ADVERSARIAL['"%" * 100000']) == []
    nested = "(" * 10_000 + "1 + 2" + ")" * 10_000
    assert [s.ok for s in check_steps(nested + " = 3")] == [True]
    assert [s.ok for s in check_steps(nested + " = 4")] == [False]
    assert extract_answer(ADVERSARIAL["NUL bytes and surrogates"]) == "5"


# ---------------------------------------------------------------------------------------------------------
# Every GSM8K and MATH reference solution
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gsm8k():
    return {split: load_jsonl(f"gsm8k/{split}.jsonl") for split in ("train", "test")}


@pytest.fixture(scope="module")
def gsm8k_prose_errors(gsm8k):
    """{(split, index): wrong steps} of every reference solution, computed once."""
    return {(split, i): arithmetic_errors(row["answer"]) for split, rows in gsm8k.items() for i, row in enumerate(rows)}


def _plus_one(number: str) -> str:
    """The number written the same way, plus one: "2,125" -> "2,126", "0.60" -> "1.60"."""
    decimals = len(number.partition(".")[2])
    scaled = int((to_number(number) + 1) * 10**decimals)
    text = str(abs(scaled)).rjust(decimals + 1, "0")
    text = f"{'-' if scaled < 0 else ''}{text[:len(text) - decimals]}" + (f".{text[-decimals:]}" if decimals else "")
    return text


def test_every_gsm8k_reference_is_judged_right_and_its_alteration_wrong(gsm8k):
    for split, rows in gsm8k.items():
        for i, row in enumerate(rows):
            solution = row["answer"]
            final = solution[solution.rfind("####") + 4:].strip()
            where = f"{split}[{i}]: {final}"
            assert parse_reference(solution) == final, where
            assert is_correct(solution, solution) and is_correct(solution, final), where
            assert reward(solution, solution) == 1.0, where
            altered = solution[:solution.rfind("####")] + "#### " + _plus_one(final)
            assert not is_correct(altered, solution) and reward(altered, solution) == 0.0, where
    # the original RISE parser stops at the comma of these 14 test answers
    assert sum("," in row["answer"].split("####")[-1] for row in gsm8k["test"]) == 14


def test_every_gsm8k_annotation_passes_step_checking(gsm8k):
    failures, checked = [], 0
    for split, rows in gsm8k.items():
        for i, row in enumerate(rows):
            annotations = re.findall(r"<<([^<>]*)>>", row["answer"])
            # "<<12=12>>" or "<<+10=10>>" state no calculation
            expected = sum(bool(re.search(r"[0-9)]\s*[-+*/]", a.split("=")[0])) for a in annotations)
            steps = check_steps(" ".join(f"<<{a}>>" for a in annotations))
            checked += len(steps)
            assert len(steps) == expected, (split, i, annotations)
            failures += [(split, i, s) for s in steps if not s.ok]
    assert checked > 27_000
    assert failures == [], failures  # none: GSM8K's calculator annotations are all exact


def test_gsm8k_prose_arithmetic(gsm8k_prose_errors):
    """The visible text of a solution repeats its annotations, but not always faithfully: about 30 of the 8,792
    solutions state a wrong calculation in prose ("So he played 14*20=140 minutes", "$4200+$3000 = $8600"),
    and a handful are read wrongly here (units: "$1 / 2 = 50 cents"; a word operand: "day 1 * 2 = 20")."""
    flagged = [(*where, s.expression, s.stated) for where, steps in gsm8k_prose_errors.items() for s in steps]
    assert ("train", 7444, "14*20", "140") in flagged
    assert len(flagged) <= 40, flagged


def test_an_altered_gsm8k_step_is_flagged(gsm8k, gsm8k_prose_errors):
    janet = gsm8k["test"][0]["answer"]
    assert "16 - 3 - 4 = <<16-3-4=9>>9" in janet and arithmetic_errors(janet) == []
    wrong = janet.replace("<<16-3-4=9>>9", "<<16-3-4=8>>8")
    assert arithmetic_errors(wrong) == [Step("16-3-4", "8", Fraction(9), False)]
    # the same for the first calculation of every solution whose prose is clean
    tried = 0
    for split, rows in gsm8k.items():
        for i, row in enumerate(rows):
            solution = row["answer"]
            m = re.search(r"<<([^<>=]*[0-9)]\s*[-+*/][^<>=]*)=([^<>=]*)>>([0-9.,]*)", solution)
            if m is None or gsm8k_prose_errors[split, i]:
                continue
            new = _plus_one(m.group(2))
            visible = new if m.group(3) else ""
            altered = solution[:m.start()] + f"<<{m.group(1)}={new}>>{visible}" + solution[m.end():]
            errors = arithmetic_errors(altered)
            # the altered annotation, and its prose twin where that is written differently ("1/2*16" vs "16*1/2")
            assert (m.group(1), new) in [(e.expression, e.stated) for e in errors], (split, i, errors)
            assert all(to_number(e.stated) == to_number(new) for e in errors), (split, i, errors)
            assert all(e.value == to_number(m.group(2)) for e in errors), (split, i, errors)
            tried += 1
    assert tried > 8_000


def test_every_math_solution_gives_its_last_boxed_answer():
    rows = load_jsonl("math/test.jsonl")
    assert len(rows) == 1000

    def last_boxed(text):  # an independent brace counter
        start = text.index("{", text.rfind("\\boxed")) + 1
        depth = 1
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return text[start:end].strip()

    for i, row in enumerate(rows):
        solution = row["solution"]
        answer = last_boxed(solution)
        assert parse_reference(solution) == answer, i
        assert extract_answer(solution) == answer, i
        assert is_correct(solution, solution) and is_correct(solution, answer), i
        k = solution.rfind("\\boxed")
        altered = solution[:k] + solution[k:].replace(answer, answer + "+1", 1)
        assert not is_correct(altered, solution), i

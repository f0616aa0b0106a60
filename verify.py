"""verify.py: the automatic answer checker that is RISE's only reward signal.

RISE (Recursive Introspection, Qu et al. 2024) learns from nothing but whether an attempt's final answer is
right: data collection keeps the best of several attempts per turn (paper §4) and weights each by its
advantage (§3), and the evaluation metrics m1@t1, m1@t5 and p1@t5 count correct answers (§5). A bug here trains on
noise, so this file is deliberately strict about what it accepts and never guesses. It also splits wrong
solutions into arithmetic slips and other errors for the error analysis of §6, by re-doing every stated
calculation ("16 - 3 - 4 = 9", GSM8K's "<<16-3-4=9>>") in exact rational arithmetic.

    extract_answer(response)         -> "2,125", "\\frac{1}{2}", ... or None    (last answer in the text)
    parse_reference(reference)       -> the final answer of a GSM8K/MATH solution or of a bare answer
    to_number(answer)                -> Fraction or None        answers_equal(a, b) -> bool
    is_correct(response, reference)  -> bool                    reward(response, reference) -> 1.0 / 0.0 / -1.0
    canonical_answer(answer)         -> a string to majority-vote on (m5@t1, m1@t5)
    check_steps(text) -> [Step]      arithmetic_errors(text) -> the Steps that are wrong

Conventions (decided here, tested in tests/test_verify.py):
- The LAST answer by position wins, among `\\boxed{}`, `#### N`, "The answer is N" and "Final answer: N". Only if
  there is none, the last number of the text counts (lm-evaluation-harness's "flexible" GSM8K match), unless
  strict=True. An answer stated as a calculation is its result ("the answer is 16 - 3 - 4 = 9", "\\boxed{16-3-4=9}":
  9); two numbers joined by "or"/"and" ("5 or 6", "between 5 and 6") are a hedge, kept whole, equal to no number.
- Numbers compare exactly as Fractions, ignoring `$`, `%`, thousands commas, a trailing period or units word
  and a leading "x =": "18.00" == "18", "$1,000.50" == "1000.5", "0.5" == "1/2" == "\\frac{1}{2}", "5%" == "5"
  (GSM8K writes percentages without the sign, so `%` is dropped rather than read as /100). Also "5e2" == 500
  (exactly: "1e309" is 10^309), "1 000" == "1000" (spaces, thin or not, between groups of three), "€18" == "EUR 18"
  == "18" (€, £, ¥, ₹, USD, EUR, GBP read as `$`), "٤٢" == "４２" == "42" (any Unicode digits), "\\sqrt5" == "\\sqrt{5}".
- A comma is a thousands separator only in groups of three ("2,125"). "1,5" is not guessed to be 1.5 or 15: it is
  not a number, and compares only as a string. Numbers over 1,000 characters, or with an exponent over 3
  digits, are likewise strings only.
- Anything else (MATH's "x^2+1", "(A)") compares as a string with spacing, `$`, `\\left`/`\\right`, `\\!` and
  `\\text{}` wrappers removed.
- A number given instead of text (`reward(response, 5)`, a reference of 2.5) is that number exactly; any other
  non-string is a caller's bug and raises TypeError. Control characters (NUL, ...) never make answers unequal.
It never executes its input (no eval, exec or sympy), never raises on text, and its time grows linearly with the
input (a 1 MB input takes well under a second).
"""

import operator
import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction

MAX_NUMBER_CHARS = 1000  # longer "numbers" are compared as strings (and int() refuses > 4300 digits)
MAX_BITS = 10_000  # step checking gives up on values larger than about 10^3000 ("9^9^9^9")
MAX_EXPR_CHARS = 100_000  # longer "calculations" are not checked
MAX_STEPS = 1000  # a real solution states a few dozen calculations at most

# ---------------------------------------------------------------------------------------------------------
# Finding the final answer of a response
# ---------------------------------------------------------------------------------------------------------

# Text is read with its Unicode digits as ASCII ones ("４２", "٤٢"; all lie below U+20000), odd spaces (thin,
# no-break) as spaces, and currency symbols and codes as "$" ("€18", "18£", "EUR 18"): one form each, so that no
# pattern below needs more. A translation table, and a regex led by the codes' letters (not in a word: "EURO" is
# no code), since a regex that tests every character is several times slower on a long text.
_PLAIN_CHARS = {ord(c): str(unicodedata.decimal(c)) if c.isdecimal() else " "
                for c in map(chr, range(128, 0x20000)) if c.isdecimal() or c.isspace()}
_PLAIN_CHARS |= dict.fromkeys(map(ord, "€£¥₹"), "$")
_CURRENCY_CODE = re.compile(r"(?:USD|EUR|GBP)(?<![A-Za-z]...)(?![A-Za-z]) ?")
# thousands separated by spaces: "1 000 000" (only groups of three, so that "3 4" or "5 60" stay two numbers)
_SPACED = r"[0-9]{1,3}(?: [0-9]{3})+(?![0-9])"
# A number as models write it: sign, "$", digits with commas or spaces, decimals, "e-3", "a/b", "%". Loose on
# purpose (to_number decides what it means). An "e" is an exponent only before a digit ("5 eggs" is 5).
# A sign right after a digit or a word is a minus, not part of the number ("10-3", "x - 3").
_SIGN = r"(?:[-+−](?<![0-9A-Za-z)\]][-+−])(?<![0-9)\]] [-+−]))?"
_LOOSE_NUMBER = (_SIGN + rf"(?:\\?\$ ?)?(?:(?:{_SPACED}|[0-9][0-9,]*)(?:\.[0-9]+)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
                 r"(?: ?/ ?[0-9][0-9,]*(?:\.[0-9]+)?)?(?: ?\\?%)?")
_TEX_FRACTION = r"[-+−]?\\[dt]?frac ?\{[^{}]{1,60}\} ?\{[^{}]{1,60}\}"
_VALUE = rf"(?:{_TEX_FRACTION}|{_LOOSE_NUMBER})"
# "16 - 3 - 4 = 9": a calculation whose result, after its last "=", is the answer (at most 200 characters, so
# that finding its last "=" stays cheap)
_CALCULATION = r"[-−]?[0-9(](?:[-+−*/×÷·^()0-9 =$]|[.,](?=[0-9])|[eE](?=[-+]?[0-9])|\\(?:times|cdot|div)){0,200}= ?"
# Two numbers joined by "or" or "and" ("5 or 6", "between 5 and 6") are a hedge: captured whole, they are no
# number and equal no single answer. "5/6" is a fraction, not a hedge.
_CAPTURE = rf"((?:{_CALCULATION})?{_VALUE}(?: {{1,3}}(?:or|and) {{1,3}}{_VALUE})?)"
# what may sit between "answer is" and the number: spaces, **bold**, $math$, \text{...}, "either", "between"
_MARKUP = r"(?:[\s*_$]|\\\(|\\\[|\\text\{|\\textbf\{|\\mathbf\{|either |between ){0,8}"


def _nested_braces(depth: int) -> str:
    """A regex for text whose braces are balanced, nested up to `depth` deep ("normal* (special normal*)*", which
    cannot backtrack catastrophically). Real answers nest 2 deep: \\boxed{\\frac{\\sqrt{3}}{2}}."""
    pattern = r"[^{}]*"
    for _ in range(depth):
        pattern = r"[^{}]*(?:\{" + pattern + r"\}[^{}]*)*"
    return pattern


# every quantifier below is bounded or unambiguous, so no input makes these regexes backtrack for long
_BOXED = re.compile(r"\\(?:boxed|fbox) {0,3}\{(" + _nested_braces(6) + r")\}")
_PHRASE = re.compile(r"(?i:answer)(?:\s{0,3}(?i:is|was|=|:|will\s{1,3}be)){0,2}" + _MARKUP + _CAPTURE)
_HASHES = re.compile(r"####" + _MARKUP + _CAPTURE)
_ANY_NUMBER = re.compile(_VALUE)
_RESULT = re.compile(rf"{_CALCULATION}({_VALUE})")


def _as_text(value, name: str) -> str:
    """A string as it is, a number (5, 2.5, Fraction) written out exactly ("5", "5/2"); anything else is a bug."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, Fraction)) and not isinstance(value, bool):
        try:  # repr, not the float's binary value: 0.1 means 1/10
            return str(Fraction(repr(value)) if isinstance(value, float) else Fraction(value))
        except (ValueError, OverflowError):
            raise ValueError(f"{name} {value!r} is not a finite number") from None
    raise TypeError(f"{name} must be text or a number, not {type(value).__name__} {value!r:.60}")


def _plain(text: str) -> str:
    """The text with plain digits, spaces and "$" (see _PLAIN_CHARS). It costs a pass over the text, so it is done
    where text comes in (responses, references) and in _strip_markup, not on every call."""
    return _CURRENCY_CODE.sub("$", text if text.isascii() else text.translate(_PLAIN_CHARS))


def _tidy(answer: str) -> str:
    """An answer without its surrounding spaces and comma, nested boxes ("\\boxed{\\boxed{7}}" is 7), or the
    calculation it is the result of ("16 - 3 - 4 = 9" is 9)."""
    answer = answer.strip().rstrip(",").strip()
    while m := _BOXED.fullmatch(answer) or _RESULT.fullmatch(answer):
        answer = m.group(1).strip()
    return answer


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The final answer of a response as written ("2,125", "\\frac{1}{2}"), or None if it gives none.

    The last of `\\boxed{}`, `#### N`, "the answer is N", "final answer: N" counts; with none of those, the last
    number in the text, unless `strict` (then None)."""
    text = _plain(_as_text(text, "response"))
    # group 1 of each pattern is the answer: the content of a complete \boxed{}, or the number after the phrase
    candidates = [(m.start(1), _tidy(m.group(1))) for pattern in (_BOXED, _PHRASE, _HASHES)
                  for m in pattern.finditer(text)]
    candidates = [c for c in candidates if c[1]]  # an empty \boxed{} is no answer
    if candidates:
        return max(candidates, key=lambda c: c[0])[1]
    if strict:
        return None
    numbers = _ANY_NUMBER.findall(text)
    return _tidy(numbers[-1]) if numbers else None


def parse_reference(reference: str) -> str | None:
    """The final answer of a reference: the text after GSM8K's last `####`, else the last \\boxed{} of a MATH
    solution, else the reference itself (a bare answer such as "2,125" or "\\frac{1}{2}", or a number: 5, 2.5)."""
    reference = _plain(_as_text(reference, "reference"))
    if "####" in reference:
        answer = reference.rpartition("####")[2].strip().partition("\n")[0].strip()
    elif boxes := _BOXED.findall(reference):
        answer = _tidy(boxes[-1])
    else:
        answer = reference.strip()
    return answer or None


# ---------------------------------------------------------------------------------------------------------
# Comparing two answers
# ---------------------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # all but tab and newline, which are spacing
_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|boxed)\s*\{([^{}]*)\}")
_MARKUP_REPLACEMENTS = [("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", " "), ("\\ ", " "),
                        ("\\$", ""), ("$", ""), ("\\%", "%"), ("−", "-"), ("\\dfrac", "\\frac"),
                        ("\\tfrac", "\\frac"), ("^{\\circ}", ""), ("^\\circ", ""), ("**", ""),
                        ("\\displaystyle", "")]
# LaTeX's one-digit arguments: "\\sqrt5" is \\sqrt{5}, "\\frac12" is \\frac{1}{2}
_TEX_SHORTHAND = [(re.compile(r"\\sqrt *([0-9])"), r"\\sqrt{\1}"),
                  (re.compile(r"\\frac *([0-9]) *([0-9])"), r"\\frac{\1}{\2}")]


def _strip_markup(answer: str) -> str:
    """Remove what does not change an answer's meaning: LaTeX spacing and sizing, $ signs and currencies,
    \\text{} wrappers, control characters, the form of digits."""
    answer = _WRAPPER.sub(r" \1 ", _CONTROL.sub("", _plain(answer)))
    for old, new in _MARKUP_REPLACEMENTS:
        answer = answer.replace(old, new)
    for pattern, new in _TEX_SHORTHAND:
        answer = pattern.sub(new, answer)
    return answer.strip().rstrip(".").strip()


# Integers: "2,125" (commas in groups of three only), "18"; decimals: also "1 000", "18.00", "18.", ".5", "2.5e-3"
# (an exponent of at most three digits, so that the value's digits stay well within what str() of an int allows)
_INTEGER = r"(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)"
_DECIMAL = rf"(?:(?:{_SPACED}|{_INTEGER})(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]{{1,3}})?"
_NUMBER = re.compile(
    rf"(?:[A-Za-z]\s*=\s*)?([-+]?)\s*"                                    # "x = ", sign
    rf"(?:({_DECIMAL})(?:\s*/\s*({_DECIMAL}))?"                          # 18, 1,000.50, 1/2
    rf"|\\frac\s*\{{\s*([-+]?\s*(?:{_DECIMAL}))\s*\}}\s*\{{\s*([-+]?\s*(?:{_DECIMAL}))\s*\}})"  # \frac{1}{2}
    r"\s*%?(?:\s+(?!pi\b)[A-Za-z]{2,}(?:\s+[A-Za-z]+){0,3})?")           # 5%, "18 dollars", "5 cm"


def _decimal(text: str) -> Fraction:
    """Exact value of a validated decimal string: "1,000.50" -> 2001/2, "-18 000" -> -18000, "1e309" -> 10^309.
    No floats."""
    text, _, exponent = text.replace(",", "").replace(" ", "").lower().partition("e")
    whole, _, decimals = text.lstrip("+-").partition(".")
    # "1000.50" is 100050 / 10^2, "2.5e-3" is 25 / 10^1 * 10^-3
    value = Fraction(int(whole + decimals or "0"), 10 ** len(decimals)) * Fraction(10) ** int(exponent or "0")
    return -value if text.startswith("-") else value


def to_number(answer: str) -> Fraction | None:
    """The exact value of an answer, or None if it is not a plain number (or over MAX_NUMBER_CHARS long)."""
    answer = _as_text(answer, "answer")
    if len(answer) > 4 * MAX_NUMBER_CHARS:
        return None
    text = _strip_markup(answer)
    m = _NUMBER.fullmatch(text) if len(text) <= MAX_NUMBER_CHARS else None
    if m is None:
        return None
    sign, *parts = m.groups()
    # the numerator, then the denominator of "1/2", "\frac{1}{2}" or "\frac12" (1 when there is none)
    numerator, denominator = ([_decimal(part) for part in parts if part] + [Fraction(1)])[:2]
    if denominator == 0:  # "1/0" is not a number
        return None
    return -numerator / denominator if sign == "-" else numerator / denominator


def _normalise_text(answer: str) -> str:
    return "".join(_strip_markup(answer).split()).rstrip(".")


def answers_equal(a: str, b: str) -> bool:
    """Same number (exactly), or, if either is not a number, the same text once markup is stripped."""
    a, b = _as_text(a, "answer"), _as_text(b, "answer")
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        return x == y
    a, b = _normalise_text(a), _normalise_text(b)
    return bool(a) and a == b


def canonical_answer(answer: str) -> str | None:
    """One string per distinct answer, for majority votes: "1/2" for "0.5" and "\\frac{1}{2}"."""
    value = to_number(answer)
    return str(value) if value is not None else (_normalise_text(answer) or None)


def is_correct(response: str, reference: str, strict: bool = False) -> bool:
    """Does the response's final answer equal the reference's? `reference` is a bare answer ("2,125") or a
    whole GSM8K solution ending in "#### N" (or a MATH solution with a \\boxed{} answer)."""
    return reward(response, reference, strict) == 1.0


def reward(response: str, reference: str, strict: bool = False) -> float:
    """The official RISE code's reward: 1.0 correct, 0.0 wrong (or no usable reference), -1.0 when the response
    has no parsable answer (so that RISE's weight exp(reward / 0.4) ranks an answerless turn lowest)."""
    predicted = extract_answer(response, strict)
    if predicted is None:
        return -1.0
    expected = parse_reference(reference)
    return 1.0 if expected is not None and answers_equal(predicted, expected) else 0.0


# ---------------------------------------------------------------------------------------------------------
# Checking the arithmetic a solution states (error analysis, paper §6)
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One stated calculation: `expression` = `stated`. `value` is the exact value of `expression` (None on a
    division by zero); `ok` says whether `stated` agrees with it."""
    expression: str
    stated: str
    value: Fraction | None
    ok: bool


class _Unsupported(Exception):
    """Not something we can check: not arithmetic, or too big."""


_TEX_OPERATORS = [("\\times", "×"), ("\\cdot", "·"), ("\\div", "÷"), ("\\left", ""), ("\\right", ""),
                  ("\\$", "$"), ("\\%", "%"), ("{,}", ","), ("\\(", " "), ("\\)", " "), ("\\[", " "),
                  ("\\]", " "), ("**", " "), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac")]
_TEX_FRAC = re.compile(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_ANNOTATION = re.compile(r"<<([^<>]*)>>")  # GSM8K's calculator annotations
# A run of arithmetic: digits, operators, parentheses, "$", "%", "=", with "," and "." only inside numbers and
# "x" only between numbers. Runs neither start nor end with a space, and letters end them.
_CHAR = (r"(?:[0-9$%()\[\]+\-−–*/×÷·^=]|(?<=[0-9]),(?=[0-9])|\.(?=[0-9])"
         r"|(?<=[0-9) ])x(?=\s?[0-9(]))")
_RUN = re.compile(rf"{_CHAR}(?:[ \t]*{_CHAR})*")
_TOKEN = re.compile(rf"\s*(?:({_INTEGER}(?:\.[0-9]+)?|\.[0-9]+)|(//|[-+*/^()%]))")  # a number or an operator
# "25 / 1/3" means 25 ÷ (1/3): a tight fraction after a spaced division sign is one number
_TIGHT_FRACTION = re.compile(r"(?<=/ )([0-9.]+/[0-9.]+)(?![0-9./])")
# "17/3 = 5 and 2/3": a mixed number is a sum
_MIXED_NUMBER = re.compile(r"\b([0-9]+) and (\(?[0-9]+/[0-9]+\)?)")
_DANGLING = re.compile(r"[-+*/^×÷·x](?![0-9.(])|[+*/^×÷·x]")  # an operator whose other operand is a word
_TO_ASCII = str.maketrans({"×": "*", "x": "*", "·": "*", "÷": "/", "−": "-", "–": "-",  # en dash: GSM8K's minus
                           "[": "(", "]": ")", "$": " "})
# a number, thousands separated by commas or by spaces ("18 000"), and its decimals
_LEADING_NUMBER = re.compile(rf"\s*([-+]?)\s*((?:{_SPACED}|{_INTEGER})(?:\.([0-9]+))?)")
_LEADING_ZEROS = {f"0{d}" for d in range(10)}


def _bounded(value: Fraction) -> Fraction:
    """`value`, unless it has over MAX_BITS bits: bigger values ("9^9^9^9", "5%%%...%") would make time quadratic."""
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_BITS:
        raise _Unsupported
    return value


def _power(a: Fraction, b: Fraction) -> Fraction:
    # only small integer powers: 9^9^9^9 would take forever and all memory
    if b.denominator != 1 or max(a.numerator.bit_length(), a.denominator.bit_length(), 1) * abs(b) > MAX_BITS:
        raise _Unsupported
    return a ** int(b)  # 0 ** -1 raises ZeroDivisionError, as it should


# precedence and meaning of each operator. A minus sign is "0 neg x", so that every operator takes two values;
# "//" is Python's floor division, which GSM8K's calculator annotations use; "(" binds least and stops _reduce.
_OPERATORS = {"(": (0, None), "+": (1, operator.add), "-": (1, operator.sub), "*": (2, operator.mul),
              "/": (2, operator.truediv), "//": (2, lambda a, b: Fraction(a // b)), "neg": (3, operator.sub),
              "^": (4, _power)}


def _reduce(ops: list[str], values: list[Fraction], precedence: int) -> None:
    """Apply the pending operators that bind at least as tightly as `precedence`, latest first."""
    while ops and _OPERATORS[ops[-1]][0] >= precedence:
        b, a = values.pop(), values.pop()
        values.append(_bounded(_OPERATORS[ops.pop()][1](a, b)))  # "/ 0" raises ZeroDivisionError


def _evaluate(expression: str) -> tuple[Fraction, int]:
    """Exact value of an arithmetic expression and its number of binary operators, by shunting-yard (iterative,
    so 10,000 nested parentheses are fine). Raises ZeroDivisionError, or _Unsupported for anything else."""
    if len(expression) > MAX_EXPR_CHARS:
        raise _Unsupported
    text = _TIGHT_FRACTION.sub(r"(\1)", expression.translate(_TO_ASCII).strip())
    values, ops, binary_ops, expect_operand, pos = [], [], 0, True, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _Unsupported
        pos, (number, token) = m.end(), m.groups()
        if expect_operand:
            # "0900 - 0130" is a clock, not a subtraction
            if number and len(number) <= MAX_NUMBER_CHARS and number[:2] not in _LEADING_ZEROS:
                values.append(_decimal(number))
                expect_operand = False
            elif token == "-":  # a minus sign: 0 neg x
                values.append(Fraction(0))
                ops.append("neg")
            elif token == "(":
                ops.append(token)
            elif token != "+":  # a plus sign changes nothing; any other operator needs a value before it
                raise _Unsupported
        elif number:  # "3 4" is not arithmetic
            raise _Unsupported
        elif token == ")":
            _reduce(ops, values, 1)
            if not ops:
                raise _Unsupported
            ops.pop()
        elif token == "%":  # binds to the value just read: "2 + 3%" is 2.03
            values[-1] = _bounded(values[-1] / 100)
        else:
            if token == "(":  # "2(3 + 4)" is 2 * (3 + 4): a "*", then the "(" read again
                token, pos = "*", m.start(2)
            if token != "^":  # "^" is right-associative: 2^3^2 = 2^9
                _reduce(ops, values, _OPERATORS[token][0])
            ops.append(token)
            binary_ops += 1
            expect_operand = True
    if expect_operand:
        raise _Unsupported
    _reduce(ops, values, 1)
    if ops:  # a "(" never closed
        raise _Unsupported
    return values[0], binary_ops


def _agrees(value: Fraction, expression: str, stated: str) -> bool | None:
    """Does `stated` equal `value`? Exactly, or rounded to the decimals it shows ("10/3 = 3.33", "7/2 = 4").
    Where a "%" appears, a factor of 100 either way is forgiven ("1.2 x 100% = 120"). In a sloppy chain such
    as "5 + 3 = 8 + 2 = 10", "8 + 2" is read as stating 8. None: `stated` is no number, so this is no step."""
    values = [value, value * 100, value / 100] if "%" in expression + stated else [value]
    try:
        stated_value = _evaluate(stated)[0]
    except (_Unsupported, ZeroDivisionError):
        stated_value = None  # not arithmetic, but perhaps a number followed by more text
    if stated_value in values:
        return True
    m = _LEADING_NUMBER.match(stated.translate(_TO_ASCII))
    if m and len(m.group(2)) <= MAX_NUMBER_CHARS:
        sign, digits, decimals = m.groups()
        number = _decimal(sign + digits)
        rest = m.string[m.end():].strip()
        if rest in ("", "%"):  # a plain number: forgive rounding to the decimals shown
            half_unit = Fraction(1, 2 * 10 ** len(decimals or ""))
            return any(abs(v - number) <= half_unit for v in values)
        if rest[0] in "+-*":  # a chain going on ("= 8 + 2 = 10"), not a fraction ("= 3/5")
            return number in values
    return None if stated_value is None else False


def _trim(segment: str) -> str:
    """Drop parentheses that belong to the surrounding text: "(so 3 + 4 = 7)" -> "3 + 4", "7"."""
    segment = segment.strip()
    start, extra = 0, segment.count("(") - segment.count(")")
    while extra > 0 and start < len(segment) and segment[start] in "( ":
        extra -= segment[start] == "("
        start += 1
    end = len(segment)
    while extra < 0 and end > start and segment[end - 1] in ") ":
        extra += segment[end - 1] == ")"
        end -= 1
    return segment[start:end].strip()


def _chain_steps(chain: str, annotation: bool = False) -> list[Step]:
    """Steps of "a = b = c": a = b and b = c, where the left side is a calculation (has an operator)."""
    sides = [" ".join(_trim(side).split()).replace("$ ", "$") for side in chain.split("=", MAX_STEPS)]
    steps = []
    for left, right in zip(sides, sides[1:]):
        # "M + 4 + 2 = 8", "3*30 = 30 + M": a word is part of the calculation, so we cannot check it
        if not left or not right or _DANGLING.match(right[-1]) or (_DANGLING.match(left) and not annotation):
            continue
        try:
            value, binary_ops = _evaluate(left)
        except ZeroDivisionError:
            value, binary_ops = None, 1
        except _Unsupported:
            continue
        ok = _agrees(value, left, right) if value is not None else False  # "5 / 0 = 0" is wrong
        if binary_ops and ok is not None:
            steps.append(Step(left, right, value, ok))
    return steps


def _key(step: Step) -> tuple[str, str]:
    return tuple(re.sub(r"[\s,$]", "", s.translate(_TO_ASCII)) for s in (step.expression, step.stated))


def check_steps(text: str) -> list[Step]:
    """Every calculation the text states, in order, each re-done exactly: GSM8K annotations "<<16-3-4=9>>" and
    plain equations "16 - 3 - 4 = 9", "$80,000 × 1.5 = $120,000", "10/3 = 3.33", "\\frac{3}{4} \\times 8 = 6".
    A calculation stated twice, as GSM8K does ("16 - 3 - 4 = <<16-3-4=9>>9"), is one step."""
    text = _as_text(text, "text")
    for old, new in _TEX_OPERATORS:
        text = text.replace(old, new)
    text = _TEX_FRAC.sub(r"((\1)/(\2))", text).replace("{", "(").replace("}", ")")
    text = _MIXED_NUMBER.sub(r"(\1+\2)", text)
    found = []  # (position, is_annotation, step)
    for m in _ANNOTATION.finditer(text):
        found += [(m.start(), True, step) for step in _chain_steps(m.group(1), annotation=True)]
        if len(found) >= MAX_STEPS:
            break
    # blank the annotations out (same length, so positions still order the steps) and read the visible text
    visible = _ANNOTATION.sub(lambda m: " " * len(m.group()), text)
    for m in _RUN.finditer(visible):
        if len(found) >= MAX_STEPS:
            break
        chain = m.group()
        # "8/3 = 24/Y", "2A + 3 = 9": a letter glued to the run makes its end (or start) algebra
        if visible[m.end():m.end() + 1].isalpha():
            chain = chain.rpartition("=")[0]
        if visible[m.start() - 1:m.start()].isalpha():
            chain = chain.partition("=")[2]
        if "=" in chain:
            found += [(m.start(), False, step) for step in _chain_steps(chain)]
    annotated = {_key(step) for _, is_annotation, step in found if is_annotation}
    found.sort(key=lambda f: f[0])
    return [step for _, is_annotation, step in found if is_annotation or _key(step) not in annotated][:MAX_STEPS]


def arithmetic_errors(text: str) -> list[Step]:
    """The stated calculations of `text` that are wrong."""
    return [step for step in check_steps(text) if not step.ok]

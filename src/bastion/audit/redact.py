"""Redaction of sensitive data in the audit trail's stored copies of prompts and responses.

The audit trail must show what was asked and answered without becoming a second store of card
numbers, account numbers, contact details and credentials. `Redactor` replaces what its enabled
detectors find with typed placeholders (`[CARD]`, `[IBAN]`, `[EMAIL]`, `[PHONE]`, `[SECRET]`),
so a reviewer still sees *that* a card number was pasted, and counts per detector.

Detectors favour checksums and structure over loose patterns: a card is Luhn-checked with a
plausible IIN, an IBAN passes mod-97 and its country's length, a national phone number must be
formatted like one. Every false positive is a hole in the record, every false negative a leak.
Detectors run in `DETECTORS` order, most specific first; what one claims is masked for the rest,
so a card number is never also reported as a phone number. It runs on the request path, so the
patterns are precompiled and arranged to let the regex engine skip ahead (literal or digit
first), secrets are looked for only where a marker substring occurs, and cards and phone numbers
only inside runs of digits long enough to hold one.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterable
from typing import Any

DETECTORS: tuple[str, ...] = ("secret", "card", "iban", "email", "phone")

Span = tuple[str, int, int]
Hits = Iterable[tuple[int, int]]
# Masked text keeps its length, so every detector reports offsets into the original string. NUL
# is in no detector's character classes, like the brackets of a placeholder.
_MASK = "\x00"

# --- card ---------------------------------------------------------------------------------------
_CARD = re.compile(
    r"(?a)(?<![0-9A-Za-z+])(?<!\d[.,])"
    r"[2-6]\d{3}(?:(?P<sep>[ -])\d{3,6}(?:(?P=sep)\d{1,6}){1,3}|\d{9,15})"
    r"(?![0-9A-Za-z]|[.,]\d)"
)
# The digit groups of an IBAN, valid or not, can pass as a card number.
_IBAN_HEAD = re.compile(r"(?a)(?<![A-Za-z0-9])([A-Za-z]{2})\d\d(?: ?[A-Za-z0-9]{4})* $")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_ok(digits: str) -> bool:
    if not 13 <= len(digits) <= 19 or not _luhn(digits):
        return False
    # The only 2-series ranges are Mir and Mastercard; this keeps 20xx timestamps out.
    return digits[0] != "2" or 2200 <= int(digits[:4]) <= 2204 or 2221 <= int(digits[:4]) <= 2720


def _cards(s: str, scan: _Scan) -> Hits:
    for a, b in scan.numbers()[0]:
        for m in _CARD.finditer(s, a, b):
            head = _IBAN_HEAD.search(s, max(0, m.start() - 40), m.start())
            if head and head[1].upper() in _IBAN_LENGTHS:
                continue
            sep = m.group("sep")
            groups = m.group().split(sep) if sep else [m.group()]
            # A trailing number ("... 1111 2026") can be swallowed: retry without trailing groups.
            for n in range(len(groups), 0, -1):
                if _card_ok("".join(groups[:n])):
                    yield m.start(), m.start() + (len(sep.join(groups[:n])) if sep else len(m[0]))
                    break


# --- iban ---------------------------------------------------------------------------------------
_IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20,
    "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18,
    "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "JO": 30,
    "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27,
    "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24,
    "SI": 19, "SK": 24, "SM": 27, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip
_IBAN = re.compile(
    r"(?a)(?<![0-9A-Za-z])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,3})?"
    r"(?![0-9A-Za-z])"
)


def _iban_ok(compact: str) -> bool:
    if _IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _ibans(s: str, scan: _Scan) -> Hits:
    for start in scan.numbers()[1]:
        m = _IBAN.match(s, start)
        if not m:
            continue
        text = m.group()
        compact = text.replace(" ", "").upper()
        want = _IBAN_LENGTHS.get(compact[:2])
        if want is None or len(compact) < want:
            continue
        # A following word of four letters ("... 7034 with") looks like one more group.
        end, seen = 0, 0
        while seen < want:
            seen += text[end] != " "
            end += 1
        if _iban_ok(compact[:want]) and (end == len(text) or text[end] == " "):
            yield start, start + end


# --- email --------------------------------------------------------------------------------------
# Found from each '@' outwards: scanning every word for a possible local part costs far more.
_EMAIL_LOCAL = re.compile(r"(?a)(?<![\w.%+-])[A-Za-z0-9_%+-]+(?:[.'][A-Za-z0-9_%+-]+)*\Z")
_EMAIL_DOMAIN = re.compile(
    r"(?a)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+(?P<tld>[A-Za-z]{2,63}|xn--[a-z0-9-]+)"
    r"(?![\w-]|\.[A-Za-z0-9])"
)
# `icon@2x.png` is a file name, not an address.
_NOT_TLDS = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "css", "js", "pdf", "txt"})


def _emails(s: str, _: _Scan) -> Hits:
    at = s.find("@")
    while at != -1:
        domain = _EMAIL_DOMAIN.match(s, at + 1)
        if domain and domain.group("tld").lower() not in _NOT_TLDS:
            local = _EMAIL_LOCAL.search(s, max(0, at - 65), at)  # RFC 5321: <= 64 characters
            if local:
                yield local.start(), domain.end()
        at = s.find("@", at + 1)


# --- phone --------------------------------------------------------------------------------------
# International numbers are unambiguous thanks to the `+`. National ones are only taken in the
# shapes people write phone numbers in: a NANP 3-3-4 split or a trunk `0` with separated groups,
# never a bare run of digits (those are account, order and reference numbers).
_PHONE_INTL = re.compile(r"(?a)(?<![\w+#/.-])\+\d++(?:[ .-]?\(\d{1,5}\)\d*+|[ .-]\d++)*+(?![\w+])")
_PHONE_NATIONAL = re.compile(
    r"(?a)(?<![\w+#/.,-])(?<!\d[ .-])(?:"
    r"(?:1[ .-]?)?(?:\([2-9]\d\d\)[ .-]?|[2-9]\d\d[ .-])[2-9]\d\d[ .-]\d{4}"
    r"|(?:\(0\d{1,4}\) ?|0\d{1,4}[ /-])\d++(?:[ -]\d++)*+"
    r"|0[1-9](?:\.\d\d){4}"
    r")(?![\w]|[.,/:-]\d)"
)


def _phones(s: str, scan: _Scan) -> Hits:
    for a, b in scan.numbers()[0]:
        for m in _PHONE_INTL.finditer(s, a, b):
            text = m.group()
            n = sum(c.isdigit() for c in text)
            seps = [c for c in text if c in " .-"]
            # "+12345678.90" is a signed amount, not a number to call.
            if 8 <= n <= 15 and not (seps == ["."] and len(text) - text.index(".") <= 3):
                yield m.span()
        for m in _PHONE_NATIONAL.finditer(s, a, b):
            n = sum(c.isdigit() for c in m.group())
            if 9 <= n <= (17 if m.group().startswith("00") else 12):  # 00: international prefix
                yield m.span()


# --- secret -------------------------------------------------------------------------------------
def _token(gate: str, prefix: str, rest: str) -> tuple[str, str, re.Pattern[str]]:
    # Substring tests decide whether a pattern runs at all: a test for a single character (the
    # `gate`, rare in prose) is a memchr, one for `prefix` a few microseconds, the regex a lot
    # more. The literal leads the pattern, so the engine jumps between its occurrences.
    lit = re.escape(prefix)
    return gate, prefix, re.compile(rf"{lit}(?<![\w-]{lit}){rest}(?![\w-])")


_PEM = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
    r"(?:-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\Z)"
)
_TOKENS = (
    _token("J", "eyJ", r"[A-Za-z0-9_-]{8,}+\.[A-Za-z0-9_-]{8,}+\.[A-Za-z0-9_-]{8,}+"),
    _token("-", "bst-", r"[A-Za-z0-9_-]{40,}+"),
    _token("-", "sk-", r"(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}+"),
    _token("K", "AKIA", r"[0-9A-Z]{16}"),
    _token("S", "ASIA", r"[0-9A-Z]{16}"),
    _token("_", "gh", r"[opsur]_[A-Za-z0-9]{36,}+"),
    _token("_", "github_pat_", r"[A-Za-z0-9_]{22,}+"),
    _token("x", "xox", r"[baprs]-[A-Za-z0-9-]{10,}+"),
)
# Matched against the lower-cased text, one pattern per key word so each starts with a literal.
# Only the value is replaced: the key stays readable.
_VALUE = (
    r"(?![\w-])\\?[\"']?[ \t]*(?P<sep>[:=])[ \t]*(?:"
    r"\\\"(?P<v1>[^\"\\\n\x00]+)\\\"|\"(?P<v2>[^\"\n\x00]+)\"|'(?P<v3>[^'\n\x00]+)'"
    r"|(?P<v4>[^\s\"'`,;&=\x00\\][^\s\"'`,;&\x00\\]*))"
)
_KEYS = (
    ("pass", r"pass(?:w(?:or)?d|phrase)"),
    ("pwd", r"pwd"),
    ("secret", r"secret"),
    ("api", r"api[_-]?key"),
    ("access", r"access[_-]?key"),
    ("private", r"private[_-]?key"),
    ("token", r"token"),
)
_ASSIGNMENTS = tuple((word, re.compile(rf"(?P<kind>{key}){_VALUE}")) for word, key in _KEYS)
_KEY_ENDS = ("passwd", "password", "passphrase", "pwd", "secret", "key", "token", "authorization")
_CREDENTIALS = re.compile(r"(?<![\w-])(?:bearer|basic)[ \t]+([a-z0-9._~+/-]{8,}=*)")
_PLACEHOLDER = re.compile(
    r"(?i)none|null|nil|true|false|undefined|\*+|x+|\.\.\.|…|<[^>]*>|\{\{.*\}\}|\$\{?\w+\}?"
    r"|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+|[A-Za-z_][\w.]*[(\[].*"
)


def _value_ok(kind: str, sep: str, value: str, quoted: bool) -> bool:
    if _PLACEHOLDER.fullmatch(value) or (value.isdigit() and len(value) < 6):
        return False
    if not kind.startswith("pass") and kind != "pwd" and len(value) < 8:
        return False  # "token=512", "secret: yes" are settings, not credentials
    if quoted or sep == "=":
        return True
    # "Password: must be ..." is prose; a value after ':' must look machine-made.
    return len(value) >= 16 or not value.isalpha()


def _secrets(s: str, _: _Scan) -> Hits:
    if "-----BEGIN " in s:
        yield from (m.span() for m in _PEM.finditer(s))
    for gate, prefix, pattern in _TOKENS:
        if gate in s and prefix in s:
            for m in pattern.finditer(s):
                key = m.group()[3:]
                # "sk-" starts many slugs; a real key mixes letters and digits.
                if prefix != "sk-" or (any(map(str.isdigit, key)) and any(map(str.isalpha, key))):
                    yield m.span()


def _key_before_separator(s: str) -> bool:
    """Whether a key word ends right before some ':' or '=' (True too once it gets costly)."""
    budget = 32
    for sep in ":=":
        i = s.find(sep)
        while i != -1:
            budget -= 1
            if budget < 0 or s[max(0, i - 24) : i].rstrip(" \t\"'\\").lower().endswith(_KEY_ENDS):
                return True
            i = s.find(sep, i + 1)
    return False


def _assignments(s: str, _: _Scan) -> Hits:
    if not _key_before_separator(s):  # "Bearer"/"Basic" credentials after "Authorization:"
        return
    low = s.lower()
    if len(low) != len(s):  # a character expanded ('İ'): lower-case only those that do not
        low = "".join(c if len(c.lower()) != 1 else c.lower() for c in s)
    if "bearer" in low or "basic" in low:
        yield from (m.span(1) for m in _CREDENTIALS.finditer(low))
    for word, pattern in _ASSIGNMENTS:
        if word not in low:
            continue
        for m in pattern.finditer(low):
            g = next(g for g in ("v1", "v2", "v3", "v4") if m.group(g) is not None)
            start, end = m.span(g)
            if g == "v4":  # closing brackets and sentence punctuation, as in "f(password: str)."
                while end > start and (
                    s[end - 1] in ")]}>"
                    or (s[end - 1] in ".," and (end == len(s) or s[end] in " \t\n)]}>"))
                ):
                    end -= 1
            if end > start and _value_ok(m["kind"], m["sep"], s[start:end], g != "v4"):
                yield start, end


# --- shared -------------------------------------------------------------------------------------
# Cards, IBANs and phone numbers are found from one pass over a copy of the text reduced to
# character classes (d: ASCII digit, a: ASCII letter, s: separator, x: anything else), where the
# regex engine can skip ahead to each digit at memchr speed. It yields IBAN check digits (two
# letters before them) and runs of 8+ digits and separators: every card and phone number lies in
# such a run, and a prompt has few, so the costlier patterns only look there.
_CLASSES = bytes.maketrans(
    (string.digits + string.ascii_letters + " ().-/").encode(), b"d" * 10 + b"a" * 52 + b"s" * 6
)
_NUMBERISH = re.compile(rb"d(?:(?<=aad)(d)|[ds]{7,}+)")


class _Scan:
    """What several detectors need to know about the text, computed at most once per text."""

    def __init__(self, text: str) -> None:
        self.text = text  # the current text, masked as detectors claim spans
        self._numbers: tuple[list[tuple[int, int]], list[int]] | None = None

    def numbers(self) -> tuple[list[tuple[int, int]], list[int]]:
        """(windows around digit runs, IBAN start offsets); computed on the first call only,
        which is sound because masking between detectors only removes candidates."""
        if self._numbers is None:
            s = self.text
            runs: list[tuple[int, int]] = []
            ibans: list[int] = []
            if any(d in s for d in "0123456789"):  # each test is a memchr; much prose has none
                classes = s.encode("ascii", "replace").translate(_CLASSES)  # one byte per char
                for m in _NUMBERISH.finditer(classes):
                    if m.lastindex:
                        ibans.append(m.start() - 2)
                        continue
                    a = m.start()
                    while a > 0 and m.start() - a < 2 and s[a - 1] in "+(":
                        a -= 1  # room for the '+' or '(' that starts a phone number
                    runs.append((a, min(len(s), m.end() + 2)))  # +2: lookaheads see what follows
            self._numbers = runs, ibans
        return self._numbers


Finder = Callable[[str, _Scan], Hits]
_FINDERS: dict[str, tuple[Finder, ...]] = {
    "secret": (_secrets, _assignments),
    "card": (_cards,),
    "iban": (_ibans,),
    "email": (_emails,),
    "phone": (_phones,),
}
assert tuple(_FINDERS) == DETECTORS


class Redactor:
    """Replaces what the enabled detectors find with `[NAME]` placeholders."""

    def __init__(self, detectors: Iterable[str]) -> None:
        wanted = set(detectors)
        for name in wanted:
            if name not in _FINDERS:
                raise ValueError(f"unknown redaction detector {name!r}; known: {list(DETECTORS)}")
        self.detectors: tuple[str, ...] = tuple(d for d in DETECTORS if d in wanted)
        self._finders = [(d, _FINDERS[d]) for d in self.detectors]

    def spans(self, s: str) -> list[Span]:
        """(detector, start, end) of every finding, sorted by start; spans never overlap."""
        found: list[Span] = []
        scan = _Scan(s)
        for name, finders in self._finders:
            for finder in finders:
                work = scan.text
                pieces: list[str] = []
                pos = 0
                for a, b in sorted(set(finder(work, scan))):
                    if a < pos or b <= a or _MASK in work[a:b]:  # overlaps an earlier finding
                        continue
                    pieces += (work[pos:a], _MASK * (b - a))
                    found.append((name, a, b))
                    pos = b
                if pieces:
                    scan.text = "".join(pieces) + work[pos:]
        return sorted(found, key=lambda t: t[1])

    def text(self, s: str) -> tuple[str, dict[str, int]]:
        if not self._finders or not s:
            return s, {}
        spans = self.spans(s)
        if not spans:
            return s, {}
        out: list[str] = []
        counts: dict[str, int] = {}
        pos = 0
        for name, a, b in spans:
            out += (s[pos:a], f"[{name.upper()}]")
            counts[name] = counts.get(name, 0) + 1
            pos = b
        out.append(s[pos:])
        return "".join(out), counts

    def json(self, value: Any) -> tuple[Any, dict[str, int]]:
        """A redacted copy of a JSON-like value: string values are redacted, keys never are.

        With no detectors the input itself is returned, uncopied.
        """
        if not self._finders:
            return value, {}
        counts: dict[str, int] = {}

        def walk(v: Any) -> Any:
            if isinstance(v, str):
                red, c = self.text(v)
                for k, n in c.items():
                    counts[k] = counts.get(k, 0) + n
                return red
            if isinstance(v, dict):
                return {k: walk(x) for k, x in v.items()}
            if isinstance(v, list):
                return [walk(x) for x in v]
            if isinstance(v, tuple):
                return tuple(walk(x) for x in v)
            return v

        return walk(value), counts

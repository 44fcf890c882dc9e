"""Redaction: each detector's positives and look-alikes, then precision/recall on a corpus."""

from __future__ import annotations

import base64
import copy
import json
import random
import re
import string
import time
from collections.abc import Callable
from typing import Any

import pytest

from bastion.audit.redact import DETECTORS, Redactor

ALL = Redactor(DETECTORS)
Labels = set[tuple[str, int, int]]


def redacted(s: str) -> str:
    return ALL.text(s)[0]


def luhn_complete(payload: str) -> str:
    """`payload` plus the check digit that makes it Luhn-valid."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch) * (2 - i % 2)
        total += d - 9 if d > 9 else d
    return payload + str(-total % 10)


def iban_complete(country: str, bban: str) -> str:
    num = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    return f"{country}{98 - num % 97:02d}{bban}"


def iban_valid(iban: str) -> bool:  # independent of the module, to vet generated negatives
    s = iban.replace(" ", "").upper()
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


CARDS = "4111 1111 1111 1111|5500-0000-0000-0004|378282246310005|3782 822463 10005|6011111111111117"
CARDS += "|2221000000000009|3056 930902 5904|6200 0000 0000 0005|4222 2222 2222 2"


@pytest.mark.parametrize("s", CARDS.split("|"))
def test_card_positive(s: str) -> None:
    assert redacted(f"my card is {s}, thanks") == "my card is [CARD], thanks"


def test_card_negative() -> None:
    timestamp = luhn_complete("202611271430001")  # Luhn-valid, but no 2-series IIN
    bad_iin = luhn_complete("123456781234567")
    for s in ["4111 1111 1111 1112", bad_iin, "4111 1111 1111", luhn_complete("4" * 19), timestamp]:
        assert redacted(f"ref {s} ok") == f"ref {s} ok", s
    for s in ["4111.1111.1111.1111", "x4111111111111111", "4111111111111111.50"]:
        assert redacted(f"ref {s} ok") == f"ref {s} ok", s
    assert redacted("card 4111 1111 1111 1111 2026 expiry") == "card [CARD] 2026 expiry"
    # Digit groups of a broken IBAN are no card, but a card after a flight number is one.
    assert redacted("to ch14 9991 4865 2511 0247 3 now") == "to ch14 9991 4865 2511 0247 3 now"
    assert redacted("LH12 4111 1111 1111 1111") == "LH12 [CARD]"


IBANS = (
    "DE89 3704 0044 0532 0130 00|GB82 WEST 1234 5698 7654 32|NL91ABNA0417164300|BE68539007547034"
)
IBANS += "|FR14 2004 1010 0505 0001 3M02 606|CH93 0076 2011 6238 5295 7|NO93 8601 1117 947"
IBANS += "|de89370400440532013000"


@pytest.mark.parametrize("s", IBANS.split("|"))
def test_iban_positive(s: str) -> None:
    assert redacted(f"IBAN: {s} please") == "IBAN: [IBAN] please"


def test_iban_negative() -> None:
    bad = ["DE89 3704 0044 0532 0130 01", "DE88370400440532013000", "GB82 WEST 1234 5698 7654 3"]
    bad += [iban_complete("US", "SVBKUS6S3300967386"), iban_complete("DE", "3704004405320130001")]
    for s in bad:
        assert redacted(f"to {s} now") == f"to {s} now", s
    assert redacted("BE68 5390 0754 7034 with love") == "[IBAN] with love"


def test_email() -> None:
    for s in ["jane.doe@example.com", "o'brien+tag@mail.example.co.uk", "X_1@sub-d.example.io"]:
        assert redacted(f"write to {s}.") == "write to [EMAIL].", s
    assert redacted("to:'jane@example.com', José") == "to:'[EMAIL]', José"
    for s in ["@jane_doe", "root@localhost", "icon@2x.png", "jane at example dot com", "a@b.c"]:
        assert redacted(f"see {s} now") == f"see {s} now", s


PHONES = "+44 20 7946 0958|+1 (212) 555-0147|+49 30 12345678|+33 1 23 45 67 89|+447911123456"
PHONES += "|+44 (0)20 7946 0958|(212) 555-0147|212-555-0147|212.555.0147|020 7946 0958|07911 123456"
PHONES += "|030/1234567|01 23 45 67 89|1-800-555-0199|0049 30 12345678"


@pytest.mark.parametrize("s", PHONES.split("|"))
def test_phone_positive(s: str) -> None:
    assert redacted(f"call {s} today") == "call [PHONE] today"
    assert redacted(f"tel:{s}.") == "tel:[PHONE]."


NOT_PHONES = "2026-11-27|27.11.2026|2026-11-27T14:30:00Z|14:30:00|v10.0.19045.3693|1,234,567.89"
NOT_PHONES += "|+12345678.90|ORD-2125550147|INV2125550147|#212-555-0147|2125550147|192.168.100.200"
NOT_PHONES += "|978-3-16-148410-0|20-00-00 12345678|123e4567-e89b-12d3-a456-426614174000|0.000123"
NOT_PHONES += "|12 345 678|UTC+01:00|+1 day|+0.25%|2026-11-27 09:00:00.123456"


@pytest.mark.parametrize("s", NOT_PHONES.split("|"))
def test_phone_negative(s: str) -> None:
    assert redacted(f"see {s} now") == f"see {s} now"


def test_secret_tokens() -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0"
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nAAAA==\n-----END RSA PRIVATE KEY-----"
    tokens = ["bst-" + "A1b_" * 11, "sk-" + "aB3" * 16, "sk-proj-" + "Zz9_-" * 20, jwt, pem]
    tokens += ["AKIAIOSFODNN7EXAMPLE", "ghp_" + "a1" * 18, "github_pat_" + "B2_" * 20]
    pgp = "-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOYBF\n-----END PGP PRIVATE KEY BLOCK-----"
    for s in [*tokens, pgp, "xoxb-123456789012-abcdefABCDEF"]:
        assert redacted(f"key: {s} end") == "key: [SECRET] end", s
    assert redacted("unterminated " + pem[:40]) == "unterminated [SECRET]"


def test_secret_assignments_keep_the_key() -> None:
    cases = {
        "password=hunter2 and more": "password=[SECRET] and more",
        'api_key: "AbC123xyz987"': 'api_key: "[SECRET]"',
        '{"client_secret": "s3cr3t-value-1"}': '{"client_secret": "[SECRET]"}',
        'args: "{\\"db_password\\": \\"pa55\\"}"': 'args: "{\\"db_password\\": \\"[SECRET]\\"}"',
        "Authorization: Bearer abcDEF0123456789xyz": "Authorization: Bearer [SECRET]",
        "Authorization: Basic dXNlcjpwYXNz": "Authorization: Basic [SECRET]",
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG.": "AWS_SECRET_ACCESS_KEY=[SECRET].",
    }
    for s, want in cases.items():
        assert redacted(s) == want


NOT_SECRETS = "Use sk-learn for that.|task-1234567890abcdefghijkl|AKIA1234|ghp_short|eyJhbGciOi"
NOT_SECRETS += (
    "|-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----|max_tokens=512|password=None"
)
NOT_SECRETS += (
    "|Password: must be 12 characters|token_count: 42|api_key = os.environ['OPENAI_API_KEY']"
)
NOT_SECRETS += (
    "|secret=${DB_SECRET}|def f(password: str)|the bearer of bad news|password reset link"
)
NOT_SECRETS += "|commit 3f2a9c01d4e5b6a7c8d9e0f1a2b3c4d5e6f7a8b9"


def test_secret_negative() -> None:
    for s in NOT_SECRETS.split("|"):
        assert redacted(s) == s, s


def test_redactor_api() -> None:
    with pytest.raises(ValueError, match="bogus"):
        Redactor(["card", "bogus"])
    none, value = Redactor([]), {"a": ["4111 1111 1111 1111"]}
    assert none.text("mail a@b.co") == ("mail a@b.co", {})
    assert none.json(value) == (value, {})
    only = Redactor(["phone", "email"])
    assert only.detectors == ("email", "phone")
    s = "4111 1111 1111 1111 / a@b.co / a@b.co / +44 20 7946 0958"
    want = "4111 1111 1111 1111 / [EMAIL] / [EMAIL] / [PHONE]"
    assert only.text(s) == (want, {"email": 2, "phone": 1})
    assert ALL.text(s)[1] == {"card": 1, "email": 2, "phone": 1}


def test_offsets_survive_non_ascii_text() -> None:
    s = "İstanbul büro: password=hunter2 ve kart 4111 1111 1111 1111, tel. +90 212 555 01 47"
    want = "İstanbul büro: password=[SECRET] ve kart [CARD], tel. [PHONE]"
    assert redacted(s) == want


def test_hostile_input_stays_linear() -> None:
    hostile = ["1" * 100_000, "4111 " * 20_000, "DE89 " * 20_000, "(0) " * 25_000, "@" * 100_000]
    hostile += [("a@" + "b." * 100) * 500, "password: " * 10_000, "sk-" * 30_000, "+1 " * 30_000]
    start = time.perf_counter()
    for s in hostile:
        ALL.text(s)
    assert time.perf_counter() - start < 10  # about 0.5 s; catastrophic backtracking takes hours


def test_json_redacts_values_only_and_copies() -> None:
    body: dict[str, Any] = {
        "jane@example.com": "key stays",
        "messages": [{"role": "user", "content": "card 4111 1111 1111 1111, mail jane@x.org"}],
        "n": 3,
        "t": 0.5,
        "flags": [True, None],
        "pair": ("a@b.co", 7),
    }
    before = copy.deepcopy(body)
    out, counts = ALL.json(body)
    assert body == before
    assert out["jane@example.com"] == "key stays"
    assert out["messages"][0] == {"role": "user", "content": "card [CARD], mail [EMAIL]"}
    assert (out["n"], out["t"], out["flags"], out["pair"]) == (3, 0.5, [True, None], ("[EMAIL]", 7))
    assert out["messages"] is not body["messages"] and out["flags"] is not body["flags"]
    assert counts == {"card": 1, "email": 2}


# --- labelled corpus ---------------------------------------------------------------------------
Rng = random.Random
FIRST = ["anna", "ben", "chloe", "dmitri", "eva", "farid", "grace", "hugo", "ines", "jon"]
LAST = ["schmidt", "okafor", "dubois", "rossi", "nguyen", "o'neil", "smith", "kowalska"]
DOMAINS = ["example.com", "mail.example.co.uk", "bank-example.de", "corp.example.org", "ex.io"]
ALNUM = string.ascii_letters + string.digits
# Country: BBAN shape (a = letters, n = digits).
IBAN_FORMS = {"DE": "n18", "GB": "a4n14", "FR": "n10a11n2", "NL": "a4n10", "ES": "n20", "CH": "n17"}
IBAN_FORMS |= {"IT": "a1n10a12", "NO": "n11", "BE": "n12", "AT": "n16", "PL": "n24"}


def digits(rng: Rng, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def card(rng: Rng, valid: bool = True) -> str:
    networks = [("4", 16), ("4", 13), ("4", 19), (str(rng.randint(51, 55)), 16), ("6011", 16)]
    networks += [(str(rng.randint(2221, 2720)), 16), (rng.choice(["34", "37"]), 15), ("65", 16)]
    networks += [(str(rng.randint(3528, 3589)), 16), ("36", 14), ("62", rng.choice([17, 18, 19]))]
    prefix, length = rng.choice(networks)
    pan = luhn_complete(prefix + digits(rng, length - len(prefix) - 1))
    if not valid:
        pan = pan[:-1] + str((int(pan[-1]) + rng.randint(1, 9)) % 10)
    cuts = [4, 10] if length in (14, 15) else list(range(4, length, 4))
    sep = rng.choice(["", " ", "-"])
    return sep.join(pan[a:b] for a, b in zip([0, *cuts], [*cuts, length], strict=True))


def iban(rng: Rng, kind: str = "valid") -> str:
    """A valid IBAN, or one with a wrong check ("check"), country ("country") or length ("long")."""
    country, bban = rng.choice(sorted(IBAN_FORMS)), ""
    for cls, n in re.findall(r"([an])(\d+)", IBAN_FORMS[country]):
        pool = string.ascii_uppercase if cls == "a" else string.digits
        bban += "".join(rng.choice(pool) for _ in range(int(n)))
    value = iban_complete(
        "QX" if kind == "country" else country, bban + digits(rng, kind == "long")
    )
    if kind == "check":
        value = f"{value[:2]}{(int(value[2:4]) + rng.randint(1, 90)) % 97 + 2:02d}{value[4:]}"
    assert iban_valid(value) == (kind in ("valid", "country", "long"))
    value = value.lower() if rng.random() < 0.1 else value
    return value if rng.random() < 0.4 else " ".join(re.findall(".{1,4}", value))


def email(rng: Rng) -> str:
    local = rng.choice(FIRST) + rng.choice([".", "_", ""]) + rng.choice(LAST)
    local += rng.choice(["", "", "+billing", str(rng.randint(1, 99))])
    return (local.title() if rng.random() < 0.2 else local) + "@" + rng.choice(DOMAINS)


def phone(rng: Rng) -> str:
    a, e = f"{rng.randint(2, 9)}{rng.randint(0, 8)}{rng.randint(0, 9)}", f"{rng.randint(200, 999)}"
    d, x = digits(rng, 10), rng.randint(1, 9)
    pairs = f"{d[:2]} {d[2:4]} {d[4:6]} {d[6:8]}"
    forms = [f"+44 20 {d[:4]} {d[4:8]}", f"+44 7{d[:3]} {d[3:9]}", f"+1 ({a}) {e}-{d[:4]}"]
    forms += [f"+1-{a}-{e}-{d[:4]}", f"+1.{a}.{e}.{d[:4]}", f"+49 30 {d[:8]}", f"+33 {x} {pairs}"]
    forms += [f"+41 44 {d[:3]} {d[3:5]} {d[5:7]}", f"+31 20 {d[:3]} {d[3:7]}", f"+447{d[:9]}"]
    forms += [
        f"+44 (0)20 {d[:4]} {d[4:8]}",
        f"({a}) {e}-{d[:4]}",
        f"{a}-{e}-{d[:4]}",
        f"0{x} {pairs}",
    ]
    forms += [f"{a}.{e}.{d[:4]}", f"020 {d[:4]} {d[4:8]}", f"07{d[:3]} {d[3:9]}", f"030 {d[:8]}"]
    return rng.choice([*forms, f"(030) {d[:7]}", f"1-800-{e}-{d[:4]}", f"089/{d[:7]}"])


def secret(rng: Rng) -> list[str | tuple[str, str]]:
    def rand(n: int, pool: str = ALNUM) -> str:
        return "".join(rng.choice(pool) for _ in range(n))

    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    jwt = f"{b64({'alg': 'HS256'})}.{b64({'sub': rand(8), 'iat': 1764000000})}.{rand(43, ALNUM)}"
    kind, body = rng.choice(["RSA ", "EC ", "OPENSSH ", ""]), rand(64, ALNUM + "+/")
    pem = (
        f"-----BEGIN {kind}PRIVATE KEY-----\n{body}\n{body[::-1]}\n-----END {kind}PRIVATE KEY-----"
    )
    tokens = [
        "bst-" + rand(43, ALNUM + "-_"),
        "sk-" + rand(48),
        "sk-proj-" + rand(120, ALNUM + "_-"),
    ]
    tokens += ["AKIA" + rand(16, ALNUM[26:]), rng.choice(["ghp_", "gho_", "ghs_"]) + rand(36), jwt]
    tokens += [f"github_pat_{rand(22)}_{rand(59)}", f"xoxb-{digits(rng, 12)}-{rand(24)}", pem]
    pw = rand(rng.randint(8, 20)) + "!"
    assigned = [("password=", pw, ""), ('"api_key": "', rand(32), '"'), ("DB_PASSWORD: '", pw, "'")]
    assigned += [("client_secret=", rand(40), ""), ("Authorization: Bearer ", rand(40), "")]
    if rng.random() < 0.5:
        return [("secret", rng.choice(tokens))]
    before, value, after = rng.choice(assigned)
    return [before, ("secret", value), after]


TEMPLATES = {
    "card": [
        "Please block card {} now, it was stolen.",
        "EUR 49.90 charged on {} twice?",
        "card:{}",
    ],
    "iban": ["Transfer EUR 1,250.00 to {} by Friday.", "My salary account is {}.", "IBAN:{}"],
    "email": ["Send the statement to {} please.", "Her address is <{}>, she said.", "mailto:{}"],
    "phone": ["Call me back on {} after 5pm.", "He gave {} as his number.", "(tel. {})"],
    "secret": ["Here is my config: {}", "Why does {} fail with 401?", "log line: {} (rotated)"],
}
GENERATORS: dict[str, Callable[[Rng], Any]] = {"card": card, "iban": iban, "email": email}
GENERATORS |= {"phone": phone, "secret": secret}


def negative(rng: Rng, i: int) -> str:
    """Hard negative number `i % 17`: look-alikes of what the detectors look for."""
    r, hexa = rng.randint, rng.getrandbits

    def d(n: int) -> str:
        return digits(rng, n)

    amounts = f"EUR {r(1, 999)},{d(3)},{d(3)}.{d(2)} / +{r(1, 99)},{d(3)}.{d(2)} / -{d(8)}.{d(2)}"
    uuid = f"{hexa(32):08x}-{d(4)}-4{d(3)}-a{d(3)}-{hexa(48):012x}"
    ids = f"ORD-{d(10)}, invoice INV{d(10)}, order #{r(200, 999)}-{r(200, 999)}-{d(4)}"
    return [
        f"Card {card(rng, valid=False)} was declined: invalid number.",
        f"Reference {luhn_complete(rng.choice('01789') + d(14))} for the ticket.",
        f"Transfer to {iban(rng, rng.choice(['check', 'country', 'long']))} failed validation.",
        f"Booked on {r(2020, 2030)}-{r(1, 12):02d}-{r(1, 28):02d} at {r(0, 23):02d}:{d(2)}:{d(2)}.",
        f"Value date {r(1, 28):02d}.{r(1, 12):02d}.{r(2020, 2030)}, ts 2026-11-27T{d(2)}:15:00Z",
        f"Balance: {amounts}",
        f"Upgrade to v{r(1, 20)}.{r(0, 99)}.{r(0, 999)} (build 10.0.{d(5)}.{d(4)})",
        f"Request {hexa(128):032x} from {uuid}",
        f"Fixed in commit {hexa(160):040x} (short {hexa(28):07x}).",
        f"Order {ids} shipped.",
        f"Tracking number {d(10)}, account {d(12)}, customer no. {d(9)}.",
        f"Server {r(1, 255)}.{r(0, 255)}.{r(0, 255)}.{r(0, 255)}:{r(1024, 65535)} is down.",
        f"Sort code {r(10, 99)}-{d(2)}-{d(2)}, acct {d(8)}; ISBN 978-{d(1)}-{d(2)}-{d(6)}-{d(1)}",
        f"Ping @{rng.choice(FIRST)}; see icon@2x.png, {rng.choice(FIRST)}@localhost, a@b.c",
        f"Write to {rng.choice(FIRST)} at example dot com, not to {rng.choice(FIRST)}@intranet.",
        rng.choice(NOT_SECRETS.split("|"))
        + f" (max_tokens={r(64, 4096)}, token_count: {r(1, 999)})",
        f"Meeting {r(8, 17):02d}:00-{r(8, 17):02d}:30, room {d(4)}, rate {r(0, 9)}.{d(3)}%, "
        f"{r(1, 99)} {d(3)} {d(3)} EUR, UTC+0{r(1, 9)}:00, +{r(1, 9)} days",
    ][i % 17]


def corpus() -> list[tuple[str, Labels]]:
    rng, items = random.Random(20251127), []
    for i in range(500):
        kind = DETECTORS[i % len(DETECTORS)]
        before, after = rng.choice(TEMPLATES[kind]).split("{}")
        found = GENERATORS[kind](rng)
        items.append([before, *(found if kind == "secret" else [(kind, found)]), after])
    for i in range(100):  # several findings in one message
        items.append(["Mail ", ("email", email(rng)), " or call ", ("phone", phone(rng))])
        items[-1] += [f" about card {i}: ", ("card", card(rng)), ", IBAN ", ("iban", iban(rng))]
    out: list[tuple[str, Labels]] = []
    for parts in items:
        text, labels = "", set()
        for p in parts:
            if isinstance(p, tuple):
                labels.add((p[0], len(text), len(text) + len(p[1])))
            text += p[1] if isinstance(p, tuple) else p
        out.append((text, labels))
    return out + [(negative(rng, i), set()) for i in range(400)]


def test_precision_recall_on_labelled_corpus() -> None:
    items = corpus()
    tp, fp, fn = (dict.fromkeys(DETECTORS, 0) for _ in range(3))
    for text, labels in items:
        found = set(ALL.spans(text))
        for counter, spans in ((tp, found & labels), (fp, found - labels), (fn, labels - found)):
            for name, _, _ in spans:
                counter[name] += 1
    n_pos, n_neg = sum(len(lb) for _, lb in items), sum(not lb for _, lb in items)
    print(f"\n{len(items)} texts: {n_pos} labelled spans, {n_neg} hard-negative texts")
    print(f"{'detector':<8} {'tp':>4} {'fp':>4} {'fn':>4} {'precision':>9} {'recall':>7}")
    prec = {n: tp[n] / (tp[n] + fp[n]) if tp[n] + fp[n] else 0.0 for n in DETECTORS}
    rec = {n: tp[n] / (tp[n] + fn[n]) if tp[n] + fn[n] else 0.0 for n in DETECTORS}
    for n in DETECTORS:
        print(f"{n:<8} {tp[n]:>4} {fp[n]:>4} {fn[n]:>4} {prec[n]:>9.3f} {rec[n]:>7.3f}")
    assert n_pos >= 300 and n_neg >= 300 and min(tp.values()) >= 60
    assert prec["card"] == rec["card"] == prec["iban"] == rec["iban"] == 1.0
    assert min(prec["email"], rec["email"], prec["secret"], rec["secret"]) >= 0.99
    assert prec["phone"] >= 0.95 and rec["phone"] >= 0.9

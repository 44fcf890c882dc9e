"""Known-vulnerability audit of hash-pinned lock files (scripts/audit runs it).

Two sources of advisories, one verdict:
  --osv-db PATH        offline: OSV advisories for PyPI (the folder or the all.zip that OSV
                       publishes per ecosystem), copied onto an air-gapped machine by the bank;
  --pip-audit-json F   online: what pip-audit found (one JSON file per lock).
Accepted advisories (requirements/audit-accepted.txt) must name an expiry date and a reason.

Exit status: 0 nothing known, 1 a known vulnerability (or an expired acceptance),
3 nothing could be audited (pip-audit skipped every package: the service was not reachable).
Runs in the supply-tools venv (scripts/supply-tools.sh), which has `packaging`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

from packaging.version import InvalidVersion, Version

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def norm(name: str) -> str:
    """PEP 503 name: advisories and locks spell names differently (Jinja2, jinja2)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m:
            pins[norm(m.group(1))] = m.group(2)
    if not pins:
        raise SystemExit(f"{path}: no pinned package (name==version) found")
    return pins


def read_accepted(path: Path, today: dt.date) -> tuple[dict[str, str], list[str]]:
    """`ID PACKAGE YYYY-MM-DD reason…` per line; an expired line is an error, not a pass."""
    accepted, errors = {}, []
    if not path.exists():
        return accepted, errors
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 3)
        if len(parts) < 4:
            errors.append(f"{path}:{n}: want 'ID PACKAGE YYYY-MM-DD reason', got {line!r}")
            continue
        vuln_id, pkg, until, reason = parts
        try:
            expiry = dt.date.fromisoformat(until)
        except ValueError:
            errors.append(f"{path}:{n}: {until!r} is not a date (YYYY-MM-DD)")
            continue
        if expiry < today:
            errors.append(f"{path}:{n}: acceptance of {vuln_id} ({pkg}) expired on {until}")
            continue
        accepted[vuln_id] = f"{norm(pkg)}: {reason} (until {until})"
    return accepted, errors


def advisories(db: Path) -> Iterator[dict]:
    if db.is_dir():
        for f in sorted(db.rglob("*.json")):
            yield json.loads(f.read_text())
    elif zipfile.is_zipfile(db):
        with zipfile.ZipFile(db) as z:
            for name in z.namelist():
                if name.endswith(".json"):
                    yield json.loads(z.read(name))
    else:
        raise SystemExit(f"{db}: neither a folder of OSV JSON files nor a zip of them")


def _v(text: str) -> Version | None:
    try:
        return Version(text)
    except InvalidVersion:
        return None


def in_range(version: Version, events: list[dict]) -> bool:
    """OSV ECOSYSTEM range: affected from each `introduced` up to the next `fixed` (exclusive)
    or `last_affected` (inclusive); events are applied in version order."""
    points = []
    for ev in events:
        for kind, raw in ev.items():
            v = Version("0") if raw == "0" else _v(raw)
            if v is not None and kind in ("introduced", "fixed", "last_affected"):
                points.append((v, kind))
    affected = False
    for v, kind in sorted(points, key=lambda p: (p[0], p[1] != "introduced")):
        if kind == "introduced" and version >= v:
            affected = True
        elif (kind == "fixed" and version >= v) or (kind == "last_affected" and version > v):
            affected = False
    return affected


def osv_findings(pins: dict[str, str], db: Path) -> list[tuple[str, str, str, str]]:
    found = []
    for adv in advisories(db):
        if adv.get("withdrawn"):
            continue
        for aff in adv.get("affected", []):
            pkg = aff.get("package", {})
            name = norm(pkg.get("name", ""))
            if pkg.get("ecosystem") != "PyPI" or name not in pins:
                continue
            version = _v(pins[name])
            if version is None:
                continue
            listed = {str(_v(x)) for x in aff.get("versions", []) if _v(x)}
            hit = str(Version(version.public)) in listed or any(
                in_range(Version(version.public), r.get("events", []))
                for r in aff.get("ranges", [])
                if r.get("type") in ("ECOSYSTEM", "SEMVER")
            )
            if hit:
                found.append((name, pins[name], adv["id"], ",".join(adv.get("aliases", []))))
    return found


def pip_audit_findings(report: Path) -> tuple[list[tuple[str, str, str, str]], int, int]:
    data = json.loads(report.read_text())
    found, skipped = [], 0
    deps = data.get("dependencies", [])
    for dep in deps:
        if "skip_reason" in dep:
            skipped += 1
        for v in dep.get("vulns", []):
            found.append((norm(dep["name"]), dep["version"], v["id"], ",".join(v["aliases"])))
    return found, skipped, len(deps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("locks", nargs="+", type=Path)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--osv-db", type=Path)
    src.add_argument("--pip-audit-json", type=Path, nargs="+", help="one report per lock")
    ap.add_argument("--accepted", type=Path, default=Path("requirements/audit-accepted.txt"))
    ap.add_argument("--today", type=dt.date.fromisoformat, default=dt.date.today())
    args = ap.parse_args()
    accepted, errors = read_accepted(args.accepted, args.today)
    found, unaudited = [], []
    for i, lock in enumerate(args.locks):
        pins = read_lock(lock)
        if args.osv_db:
            hits = osv_findings(pins, args.osv_db)
        else:
            hits, skipped, total = pip_audit_findings(args.pip_audit_json[i])
            if skipped:
                unaudited.append(f"{lock}: {skipped} of {total} packages not audited")
        found += [(lock, *h) for h in hits]
    for lock, name, version, vuln_id, aliases in sorted(set(found)):
        also = f" ({aliases})" if aliases else ""
        if vuln_id in accepted and accepted[vuln_id].startswith(f"{name}:"):
            print(f"accepted  {lock}: {name}=={version} {vuln_id}{also}: {accepted[vuln_id]}")
        else:
            errors.append(f"{lock}: {name}=={version} has known vulnerability {vuln_id}{also}")
    for line in errors:
        print(f"VULNERABLE {line}" if "known vulnerability" in line else f"ERROR {line}")
    if errors:
        return 1
    if unaudited:
        for line in unaudited:
            print(f"NOT AUDITED {line}")
        return 3
    print(f"no known vulnerability in {', '.join(map(str, args.locks))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

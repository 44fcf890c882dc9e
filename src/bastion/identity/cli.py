"""`bastion login`, `bastion logout` and `bastion keys mint`: sign in with directory credentials,
mint keys, sign out.

The session token is kept in `$XDG_CONFIG_HOME/bastion/session` (mode 0600) for later commands,
and printed so it can be exported as `OPENAI_API_KEY` for a quick try.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from bastion.config import load_settings


def session_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "bastion" / "session"


def _base(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    s = load_settings(args.config).server
    return (s.public_url or f"http://{s.host}:{s.port}").rstrip("/")


def _post(url: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=orjson.dumps(body), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return orjson.loads(resp.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:
        detail = orjson.loads(exc.read() or b"{}").get("error", {}).get("message", "")
        raise ValueError(f"{exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ValueError(f"cannot reach the gateway at {url}: {exc}") from None


def cmd_login(args: argparse.Namespace) -> int:
    user = args.user or input("Username: ")
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass()
    try:
        result = _post(_base(args) + "/auth/login", {"username": user, "password": password})
    except ValueError as exc:
        sys.stderr.write(f"error: sign-in failed: {exc}\n")
        return 2
    path = session_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(result["token"] + "\n")
    sys.stderr.write(
        f"Signed in as {result['user']} (team {result['team']}, role {result['role']}); "
        f"session saved in {path}.\n"
    )
    sys.stdout.write(result["token"] + "\n")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    path = session_file()
    if not path.is_file():
        sys.stderr.write("not signed in\n")
        return 0
    body = {"everywhere": bool(args.everywhere)}
    try:
        done = _post(_base(args) + "/auth/logout", body, path.read_text().strip())
    except ValueError as exc:
        if not str(exc).startswith("401"):  # an ended session is as good as signed out
            sys.stderr.write(f"error: sign-out failed: {exc}\n")
            return 2
        done = {"sessions_ended": 0}
    path.unlink(missing_ok=True)
    sys.stderr.write(f"Signed out ({done['sessions_ended']} session(s) ended).\n")
    return 0


def cmd_mint(args: argparse.Namespace) -> int:
    path = session_file()
    if not path.is_file():
        sys.stderr.write("error: not signed in: run `bastion login` first\n")
        return 2
    body = {"name": args.name or "", "expires_in": args.expires}
    try:
        rec = _post(_base(args) + "/auth/keys", body, path.read_text().strip())
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stderr.write(f"Created key {rec['id']} for team {rec['team']}; it is shown only once.\n")
    sys.stdout.write(rec["key"] + "\n")
    return 0


def add_parsers(sub: Any, keys: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("login", parents=[common], help="sign in with directory credentials")
    s.add_argument("--url", help="gateway URL (default: from the config)")
    s.add_argument("--user")
    s.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    s.set_defaults(func=cmd_login)
    s = sub.add_parser("logout", parents=[common], help="end your session (bastion login)")
    s.add_argument("--url", help="gateway URL (default: from the config)")
    s.add_argument("--everywhere", action="store_true", help="end all your sessions")
    s.set_defaults(func=cmd_logout)
    s = keys.add_parser("mint", parents=[common], help="create a key for yourself (after login)")
    s.add_argument("--url", help="gateway URL (default: from the config)")
    s.add_argument("--name")
    s.add_argument(
        "--expires", help="lifetime, e.g. 30d (default and longest: the gateway's limit)"
    )
    s.set_defaults(func=cmd_mint)

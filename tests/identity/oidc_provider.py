"""A real OIDC provider for the tests: `oidc-provider` (npm, v9) under Node, on 127.0.0.1.

Why a real one: the validator must accept what an actual IdP issues (RS256 `at+jwt` access tokens,
discovery, JWKS) and not just tokens we crafted ourselves. The client-credentials grant with a
resource indicator gives a JWT access token per client without any browser interaction; each
client stands for one test user and carries its own extra claims (`preferred_username`, `email`,
`groups`). `sub` is the client id (oidc-provider sets it so for client credentials).

For the console's sign-in, `web_clients` adds authorization-code clients (PKCE required, as
oidc-provider does by default; confidential with a secret, or public). A browser signs in through
oidc-provider's own development login and consent pages (any password); the login name is the
account id, and `users` gives each account's claims (`preferred_username`, `groups`, ...), which
go into the ID token. A login name not in `users` gets only `sub`: a user in no group.

The npm package is installed once under ~/.cache/bastion/oidc-provider and reused from there.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

CACHE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bastion/oidc-provider"
)
DEFAULT_RESOURCE = "https://bastion.test/v1"

# The provider: listens first (port 0) so the issuer can name the real port, then attaches.
# It counts JWKS downloads, so tests can check that a validator does not hammer the IdP.
SCRIPT = r"""
import http from 'node:http';
import crypto from 'node:crypto';
import Provider from 'oidc-provider';

const cfg = JSON.parse(process.env.OIDC_TEST_CONFIG);
const server = http.createServer();
server.listen(0, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const key = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
  const jwk = { ...key.export({ format: 'jwk' }), kid: cfg.kid, use: 'sig', alg: 'RS256' };
  const web = (cfg.webClients || []).map((c) => ({
    client_id: c.client_id, grant_types: ['authorization_code'], response_types: ['code'],
    redirect_uris: c.redirect_uris,
    ...(c.client_secret
      ? { client_secret: c.client_secret, token_endpoint_auth_method: 'client_secret_basic' }
      : { token_endpoint_auth_method: 'none' }),
  }));
  const provider = new Provider(issuer, {
    jwks: { keys: [jwk] },
    clients: cfg.clients.map((c) => ({
      client_id: c.client_id, client_secret: c.client_secret,
      grant_types: ['client_credentials'], response_types: [], redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_post',
    })).concat(web),
    claims: {
      openid: ['sub'], profile: ['preferred_username', 'name'], email: ['email'],
      groups: ['groups'],
    },
    // The requested scopes' claims go into the ID token itself (as Entra or Keycloak mappers do).
    conformIdTokenClaims: false,
    findAccount: (ctx, id) => ({
      accountId: id,
      claims: () => ({ ...(cfg.users[id] || {}), sub: id }),
    }),
    features: {
      devInteractions: { enabled: web.length > 0 },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        getResourceServerInfo: (ctx, resource) => ({
          scope: '', audience: resource, accessTokenTTL: 600,
          accessTokenFormat: 'jwt', jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
    extraTokenClaims: (ctx, token) => cfg.claims[token.clientId],
  });
  let jwksHits = 0;
  provider.use(async (ctx, next) => {
    if (ctx.path === '/test/jwks-hits') { ctx.body = { hits: jwksHits }; return; }
    if (ctx.path === '/jwks') jwksHits += 1;
    await next();
  });
  server.on('request', provider.callback());
  console.log(`READY ${issuer}`);
});
"""


def _installed() -> bool:
    return (CACHE_DIR / "node_modules/oidc-provider/package.json").is_file()


def node_available() -> bool:
    """Node is there, and so is the package or npm to install it."""
    return shutil.which("node") is not None and (_installed() or shutil.which("npm") is not None)


def install() -> Path:
    """Installs oidc-provider 9.13.3 into the cache dir unless already there; returns the script."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    if not _installed():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "oidc-provider@9.13.3"],
            cwd=CACHE_DIR,
            check=True,
            capture_output=True,
            timeout=300,
        )
    script = CACHE_DIR / "bastion-test-provider.mjs"
    if not script.is_file() or script.read_text() != SCRIPT:
        script.write_text(SCRIPT)
    return script


class OidcProvider:
    """Starts the provider with one client per entry of `clients` (client_id -> extra claims)."""

    def __init__(
        self,
        clients: dict[str, dict[str, Any]],
        log_path: Path,
        kid: str = "",
        *,
        web_clients: dict[str, dict[str, Any]] | None = None,
        users: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """`web_clients`: client_id -> {"redirect_uris": [...], "public": bool}."""
        script = install()
        self.kid = kid or "test-" + secrets.token_hex(4)
        self._secrets = {client_id: secrets.token_urlsafe(24) for client_id in clients}
        web = web_clients or {}
        for cid, spec in web.items():
            if not spec.get("public"):
                self._secrets[cid] = secrets.token_urlsafe(24)
        config = {
            "kid": self.kid,
            "clients": [{"client_id": cid, "client_secret": self._secrets[cid]} for cid in clients],
            "webClients": [
                {
                    "client_id": cid,
                    "client_secret": self._secrets.get(cid),
                    "redirect_uris": spec["redirect_uris"],
                }
                for cid, spec in web.items()
            ],
            "users": users or {},
            "claims": clients,
        }
        self._log = log_path.open("ab")
        self._proc = subprocess.Popen(
            ["node", str(script)],
            cwd=CACHE_DIR,
            env={**os.environ, "OIDC_TEST_CONFIG": json.dumps(config)},
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.issuer = self._wait_ready(log_path)

    def _wait_ready(self, log_path: Path, timeout: float = 30.0) -> str:
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._proc.poll() is None:
            ready, _, _ = select.select([self._proc.stdout], [], [], 0.2)
            if ready:
                line = self._proc.stdout.readline().decode().strip()
                if line.startswith("READY "):
                    return line.removeprefix("READY ")
        self.stop()
        raise RuntimeError(f"oidc-provider did not start; see {log_path}:\n{log_path.read_text()}")

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.issuer + path, timeout=10) as resp:
            return json.load(resp)

    def token(self, client_id: str, resource: str = DEFAULT_RESOURCE) -> str:
        """A JWT access token for `client_id` (client credentials grant), audience `resource`."""
        body = urllib.parse.urlencode(
            {
                "grant_type": "client_credentials",
                "client_id": client_id,
                "client_secret": self._secrets[client_id],
                "resource": resource,
            }
        ).encode()
        with urllib.request.urlopen(self.issuer + "/token", data=body, timeout=10) as resp:
            return str(json.load(resp)["access_token"])

    def secret(self, client_id: str) -> str:
        """A confidential client's secret (what the operator puts in the environment)."""
        return self._secrets[client_id]

    def jwks(self) -> dict[str, Any]:
        return dict(self._get("/jwks"))

    def jwks_hits(self) -> int:
        """How many times /jwks was downloaded (from anyone) since start."""
        return int(self._get("/test/jwks-hits")["hits"])

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._log.close()

    def __enter__(self) -> OidcProvider:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

"""A real OpenLDAP slapd for the LDAP tests, started unprivileged from a private temp folder.

Nothing of the system's LDAP config is read or written: the cn=config tree is built from an LDIF
here and loaded with `slapadd -F <folder>`, the database lives in the same folder, and slapd
listens on two free ports of 127.0.0.1 (ldap:// with StartTLS, and ldaps://). Its certificate is
issued by a throw-away CA made with `cryptography`, so tests can trust it (or not) explicitly.

OpenLDAP has no LDAP_MATCHING_RULE_IN_CHAIN: nested groups need the recursive strategy here.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import secrets
import socket
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ldap
import ldap.dn
import ldap.modlist
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
MODULES = "/usr/lib/ldap"
SCHEMAS = "/etc/ldap/schema"

BASE_DN = "dc=bank,dc=test"
ROOT_DN = f"cn=admin,{BASE_DN}"
SERVICE_DN = f"cn=bastion,ou=services,{BASE_DN}"
PEOPLE = f"ou=people,{BASE_DN}"
GROUPS = f"ou=groups,{BASE_DN}"
EVE = "eve*)(uid=*"  # a real uid made of LDAP filter metacharacters

PASSWORDS = {
    "alice": "alice-Pa55!",
    "bob": "bob-Pa55!",
    "carol": "carol-Pa55!",
    "dave": "dave-Pa55!",
    EVE: "eve-Pa55!",
}
# group cn -> members (uids of people, or "group:<cn>" for a nested group)
MEMBERS = {
    "payments-devs": ["alice", "dave"],
    "risk-analysts": ["bob"],
    "all-engineering": ["group:payments-devs"],
    "bastion-auditors": ["carol", EVE],
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def user_dn(uid: str, ou: str = "people") -> str:
    return f"uid={ldap.dn.escape_dn_chars(uid)},ou={ou},{BASE_DN}"


def group_dn(cn: str) -> str:
    return f"cn={ldap.dn.escape_dn_chars(cn)},{GROUPS}"


def ssha(password: str) -> str:
    """{SSHA} hash, as slapd stores passwords (the tree holds no plaintext)."""
    salt = secrets.token_bytes(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def make_ca(folder: Path, name: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Name]:
    """A self-signed CA; returns its PEM path, key and subject."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    path = folder / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, subject


def make_server_cert(
    folder: Path, ca_key: ec.EllipticCurvePrivateKey, ca_subject: x509.Name
) -> tuple[Path, Path]:
    """A server certificate for IP 127.0.0.1 only (no DNS name), issued by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


class Slapd:
    """One slapd process with the test tree; `start()` then `stop()` (or use as a context)."""

    base_dn = BASE_DN
    root_dn = ROOT_DN
    service_dn = SERVICE_DN
    people_base = PEOPLE
    group_base = GROUPS

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.root_password = secrets.token_urlsafe(16)
        self.service_password = secrets.token_urlsafe(16)
        self.ldap_port, self.ldaps_port = _free_port(), _free_port()
        self.ldap_url = f"ldap://127.0.0.1:{self.ldap_port}"
        self.ldaps_url = f"ldaps://127.0.0.1:{self.ldaps_port}"
        self.ca_file = ""
        self.other_ca_file = ""  # a CA that did NOT issue the server's certificate
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> None:
        for tool in (SLAPD, SLAPADD):
            if not os.access(tool, os.X_OK):
                raise RuntimeError(f"{tool} is missing: apt-get install slapd ldap-utils")
        tls, conf, data = (self.folder / d for d in ("tls", "slapd.d", "data"))
        for d in (tls, conf, data):
            d.mkdir(parents=True, exist_ok=True)
        ca, ca_key, ca_subject = make_ca(tls, "test-ca")
        self.ca_file = str(ca)
        self.other_ca_file = str(make_ca(tls, "other-ca")[0])
        cert, key = make_server_cert(tls, ca_key, ca_subject)
        (self.folder / "config.ldif").write_text(self._config_ldif(cert, key, data))
        (self.folder / "tree.ldif").write_text(self._tree_ldif())
        self._slapadd("0", self.folder / "config.ldif")
        self._slapadd("1", self.folder / "tree.ldif")
        for _ in range(3):  # a free port may be taken before slapd binds it: then new ports
            if self._launch(conf, timeout):
                return
            self.ldap_port, self.ldaps_port = _free_port(), _free_port()
            self.ldap_url = f"ldap://127.0.0.1:{self.ldap_port}"
            self.ldaps_url = f"ldaps://127.0.0.1:{self.ldaps_port}"
        raise RuntimeError(f"slapd did not start: {self.log_tail()}")

    def _launch(self, conf: Path, timeout: float) -> bool:
        with (self.folder / "slapd.log").open("wb") as log:
            self._proc = subprocess.Popen(
                [SLAPD, "-d", "0", "-F", str(conf), "-h", f"{self.ldap_url}/ {self.ldaps_url}/"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if self._listening(self.ldap_port) and self._listening(self.ldaps_port):
                return True
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"slapd did not listen within {timeout}s: {self.log_tail()}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Slapd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 2000) -> str:
        path = self.folder / "slapd.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    @staticmethod
    def _listening(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    def _slapadd(self, db: str, ldif: Path) -> None:
        conf = self.folder / "slapd.d"
        cmd = [SLAPADD, "-n", db, "-F", str(conf), "-l", str(ldif)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"slapadd -n {db} failed: {done.stdout}{done.stderr}")

    # -- LDIF -------------------------------------------------------------------------------------
    def _config_ldif(self, cert: Path, key: Path, data: Path) -> str:
        schemas = "".join(
            f"include: file://{SCHEMAS}/{s}.ldif\n\n" for s in ("core", "cosine", "inetorgperson")
        )
        return f"""dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {self.folder}/slapd.pid
olcArgsFile: {self.folder}/slapd.args
olcTLSCertificateFile: {cert}
olcTLSCertificateKeyFile: {key}

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: {MODULES}
olcModuleLoad: back_mdb
olcModuleLoad: memberof
olcModuleLoad: ppolicy

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{schemas}dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcSuffix: {BASE_DN}
olcRootDN: {ROOT_DN}
olcRootPW: {ssha(self.root_password)}
olcDbDirectory: {data}
olcAccess: {{0}}to attrs=userPassword by anonymous auth by self =xw by * none
olcAccess: {{1}}to * by dn.exact="{SERVICE_DN}" read by self read by * none

dn: olcOverlay={{0}}memberof,olcDatabase={{1}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcMemberOf
olcOverlay: {{0}}memberof

dn: olcOverlay={{1}}ppolicy,olcDatabase={{1}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcPPolicyConfig
olcOverlay: {{1}}ppolicy
"""

    def _tree_ldif(self) -> str:
        entries = [
            f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\ndc: bank\no: Bank",
            f"dn: ou=people,{BASE_DN}\nobjectClass: organizationalUnit\nou: people",
            f"dn: ou=contractors,{BASE_DN}\nobjectClass: organizationalUnit\nou: contractors",
            f"dn: ou=groups,{BASE_DN}\nobjectClass: organizationalUnit\nou: groups",
            f"dn: ou=services,{BASE_DN}\nobjectClass: organizationalUnit\nou: services",
            f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject"
            f"\ncn: bastion\nuserPassword: {ssha(self.service_password)}",
        ]
        for uid, password in PASSWORDS.items():
            entries.append(_ldif(user_dn(uid), self._person(uid, password)))
        for cn, members in MEMBERS.items():
            entries.append(_ldif(group_dn(cn), self._group(cn, members)))
        return "\n\n".join(entries) + "\n"

    @staticmethod
    def _person(uid: str, password: str) -> dict[str, list[str]]:
        name = uid.capitalize()
        return {
            "objectClass": ["inetOrgPerson"],
            "uid": [uid],
            "cn": [name],
            "sn": [name],
            "displayName": [f"{name} Example"],
            "mail": [f"{uid}@bank.test" if uid.isalnum() else "eve@bank.test"],
            "userPassword": [ssha(password)],
        }

    @staticmethod
    def _group(cn: str, members: list[str]) -> dict[str, list[str]]:
        dns = [group_dn(m[6:]) if m.startswith("group:") else user_dn(m) for m in members]
        return {"objectClass": ["groupOfNames"], "cn": [cn], "member": dns}

    # -- changes, as the root DN over LDAPS -------------------------------------------------------
    def ldap_settings(self, **extra: Any) -> dict[str, Any]:
        """Bastion's `identity.ldap` section for this server (service bind over LDAPS)."""
        return {
            "url": self.ldaps_url,
            "ca_file": str(self.ca_file),
            "bind_dn": self.service_dn,
            "bind_password": self.service_password,
            "user_base": self.base_dn,
            "group_base": self.group_base,
            **extra,
        }

    def admin(self) -> ldap.ldapobject.LDAPObject:
        """A connection bound as the root DN; the caller unbinds it."""
        conn = ldap.initialize(self.ldaps_url)
        conn.set_option(ldap.OPT_X_TLS_CACERTFILE, self.ca_file)
        conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
        conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
        conn.simple_bind_s(ROOT_DN, self.root_password)
        return conn

    def add_member(self, group: str, member_dn: str) -> None:
        self._modify(group_dn(group), ldap.MOD_ADD, member_dn)

    def remove_member(self, group: str, member_dn: str) -> None:
        self._modify(group_dn(group), ldap.MOD_DELETE, member_dn)

    def add_user(self, uid: str, password: str, ou: str = "people") -> str:
        dn = user_dn(uid, ou)
        conn = self.admin()
        try:
            conn.add_s(dn, ldap.modlist.addModlist(_encode(self._person(uid, password))))
        finally:
            conn.unbind_s()
        return dn

    def delete_entry(self, dn: str) -> None:
        conn = self.admin()
        try:
            conn.delete_s(dn)
        finally:
            conn.unbind_s()

    def _modify(self, dn: str, op: int, member_dn: str) -> None:
        conn = self.admin()
        try:
            conn.modify_s(dn, [(op, "member", [member_dn.encode()])])
        finally:
            conn.unbind_s()


def _encode(attrs: dict[str, list[str]]) -> dict[str, list[bytes]]:
    return {k: [v.encode() for v in vs] for k, vs in attrs.items()}


def _ldif(dn: str, attrs: dict[str, list[str]]) -> str:
    """One LDIF record; every value base64-encoded (`::`) so metacharacters need no care."""

    def line(name: str, value: str) -> str:
        return f"{name}:: {base64.b64encode(value.encode()).decode()}"

    return "\n".join([line("dn", dn)] + [line(k, v) for k, vs in attrs.items() for v in vs])

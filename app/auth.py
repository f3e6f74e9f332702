"""Bearer tokens and roles for the HTTP API, and `meterline token create|list|revoke`.

A token is 32 random bytes (`mlt_…`), shown once when created; only its SHA-256 is kept, in
<data_dir>/tokens.json (mode 0600). A fast hash is enough for a secret of 256 random bits (no
dictionary to try); comparing digests keeps the token itself out of memory after the check.

Roles:
  admin          everything, budgets included (changes are audited with the token's name)
  reader         reports, sandboxed SQL, the live view, /metrics, budgets (read)
  tenant:<id>    that tenant's reports, live view and budgets only; raw SQL is refused

With no token created the API stays open on loopback (the local demo) and says so at start;
on any other address `up` refuses to start until a token exists.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

TOKENS_FILE = "tokens.json"
PREFIX = "mlt_"
ROLE_RE = re.compile(r"admin|reader|tenant:[^\s/]{1,128}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the token's name and role."""

    name: str
    role: str

    @property
    def tenant(self) -> str | None:
        """The one tenant a tenant token may read (None: every tenant)."""
        return self.role.removeprefix("tenant:") if self.role.startswith("tenant:") else None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


OPEN = Principal("local (no token)", "admin")  # loopback with no token configured


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_role(role: str) -> str:
    if not ROLE_RE.fullmatch(role):
        raise ValueError(f"role {role!r} is not admin, reader or tenant:<tenant id>")
    if role.startswith("tenant:"):
        from meterline.schemas.events import HIDDEN_RE

        if HIDDEN_RE.search(role):
            raise ValueError("a tenant id has no control or invisible characters")
    return role


class TokenStore:
    """tokens.json: name -> {role, sha256, created_at}. Re-read when the file changes, so a token
    created or revoked while `up` runs takes effect on its next request."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._by_digest: dict[str, Principal] = {}
        self._extra: dict[str, Principal] = {}  # in-memory tokens (the one `up` gives local CLIs)

    # ---- reading ----------------------------------------------------------------------------

    def entries(self) -> dict[str, dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as err:
            raise ValueError(f"{self.path} is not valid JSON ({err}); fix or remove it") from None

    def configured(self) -> bool:
        """Whether any token exists (then every data request needs one)."""
        self._reload()
        return bool(self._by_digest)

    def verify(self, token: str | None) -> Principal | None:
        if not token:
            return None
        self._reload()
        key = digest(token)
        return self._extra.get(key) or self._by_digest.get(key)

    def _reload(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._by_digest = {e["sha256"]: Principal(name, e["role"]) for name, e in self.entries().items()}
            self._stamp = stamp

    # ---- writing ----------------------------------------------------------------------------

    def create(self, name: str, role: str) -> str:
        """A new token (returned once, never stored)."""
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"token name {name!r}: 1-64 letters, digits, _ . @ - (it names the holder in audits)")
        check_role(role)
        entries = self.entries()
        if name in entries:
            raise ValueError(f"a token named {name!r} exists; revoke it first or pick another name")
        token = PREFIX + secrets.token_urlsafe(32)
        entries[name] = {"role": role, "sha256": digest(token), "created_at": datetime.now(timezone.utc).isoformat()}
        self._write(entries)
        return token

    def revoke(self, name: str) -> bool:
        entries = self.entries()
        if entries.pop(name, None) is None:
            return False
        self._write(entries)
        return True

    def ephemeral(self, name: str, role: str) -> str:
        """A token that lives as long as this process (never written to tokens.json)."""
        token = PREFIX + secrets.token_urlsafe(32)
        self._extra[digest(token)] = Principal(name, check_role(role))
        return token

    def _write(self, entries: dict) -> None:
        from meterline.files import write_private

        write_private(self.path, json.dumps(entries, indent=1))


def token_store(settings) -> TokenStore:
    return TokenStore(settings.api_tokens_file or settings.data_dir / TOKENS_FILE)


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    scheme, _, token = (header or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


# ---- the CLI ----------------------------------------------------------------------------------

token_app = typer.Typer(
    help=("API tokens for `meterline up` (bearer tokens; only their hash is stored).\n\n"
          "Example:  meterline token create --name finance --role reader\n\n"
          "Roles: **admin** (budgets too), **reader** (reports, SQL, live view, metrics), **tenant:ID** (that "
          "tenant's reports and live view only). Once a token exists every API request but /health and the page "
          "needs `Authorization: Bearer TOKEN`; `meterline report` and `sql` on the same machine keep working "
          "(a running `up` leaves them a reader token in its 0600 up.json)."),
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="Who holds it (shown in audits), e.g. finance or grafana.")],
    role: Annotated[str, typer.Option(help="admin, reader or tenant:ID.")] = "reader",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Create a token and print it once (it cannot be shown again)."""
    from meterline.console import console, emit_json, fail
    from meterline.settings import get_settings

    try:
        token = token_store(get_settings()).create(name, role)
    except ValueError as err:
        fail(str(err))
    if as_json:
        emit_json({"name": name, "role": role, "token": token})
    else:
        console.print(f"token {name} ({role}); shown once, keep it safe:", markup=False, highlight=False)
        print(token)


@token_app.command("list")
def token_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False) -> None:
    """The tokens: name, role, when created (never the token)."""
    from meterline.console import console, emit_json, fail, table
    from meterline.settings import get_settings

    try:
        rows = [{"name": n, "role": e["role"], "created_at": e["created_at"]} for n, e in token_store(get_settings()).entries().items()]
    except ValueError as err:
        fail(str(err))
    emit_json(rows) if as_json else console.print(table(rows) if rows else "no tokens: the API is open on loopback only")


@token_app.command("revoke")
def token_revoke(name: Annotated[Optional[str], typer.Argument(help="The token's name.")] = None) -> None:
    """Revoke a token; a running `up` refuses it from its next request."""
    from meterline.console import console, fail
    from meterline.settings import get_settings

    if not name:
        fail("name the token to revoke (see `meterline token list`)")
    if not token_store(get_settings()).revoke(name):
        fail(f"no token named {name!r}; see `meterline token list`")
    console.print(f"revoked {name}")

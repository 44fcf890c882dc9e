"""Settings of `database:`: where keys, teams, usage and the audit trail are kept."""

from __future__ import annotations

from pydantic import Field, field_validator

from bastion.core.settings import SECRET, Strict, section


class DatabaseSettings(Strict):
    url: str = Field(
        "sqlite:///var/bastion.db",
        json_schema_extra=SECRET,
        description="SQLAlchemy URL: `sqlite:///relative.db`, `sqlite:////abs.db` or "
        "`postgresql+psycopg://user@host/db`. Env override: BASTION_DATABASE_URL.",
    )
    auto_migrate: bool | None = Field(
        None,
        description="Bring the schema to this version at every start and command. Default: "
        "yes for SQLite (the embedded, one-host database), no for PostgreSQL, where schema "
        "changes are a deliberate step (`bastion db upgrade`, under a lock, with an account "
        "that may change the schema) and every start or command only checks the schema is "
        "current and otherwise stops naming that command.",
    )
    usage_flush_seconds: float = Field(
        0.25, gt=0, le=60, description="Usage records are written in batches this often."
    )

    @property
    def migrates(self) -> bool:
        """Whether opening the database applies pending migrations."""
        return self.auto_migrate if self.auto_migrate is not None else self.embedded

    @property
    def embedded(self) -> bool:
        """SQLite: one host's file, not a database replicas share."""
        return self.url.startswith("sqlite:")

    @field_validator("url")
    @classmethod
    def _known_dialect(cls, v: str) -> str:
        if not v.startswith(("sqlite:", "postgresql")):
            raise ValueError("only sqlite:// and postgresql+psycopg:// URLs are supported")
        return v


section(
    "database",
    DatabaseSettings,
    "Where keys, teams and usage are kept.",
    env={"url": "BASTION_DATABASE_URL"},
)

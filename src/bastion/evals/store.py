"""Eval runs and their per-case results in the gateway's database.

Every result is committed on its own as soon as it is scored, so an interrupted run keeps what
finished and `--resume` only asks for the rest. Outputs are stored in clear: eval suites are
test data chosen by the bank's ML team, not customer traffic (which stays sealed in the audit
trail); a suite built from real customer conversations belongs in a database with that
protection, or should be redacted first.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from bastion.store.schema import adapter_deployments, eval_results, eval_runs, usage

#: The error text of a sample whose call to the gateway failed; a resumed run asks again.
CALL_FAILED = "call failed: "


def new_run_id() -> str:
    return "ev_" + secrets.token_hex(6)


def create_run(
    engine: Engine,
    *,
    suite: str,
    version: str,
    sha256: str,
    path: str,
    model: str,
    samples: int,
    cases_total: int,
    params: dict[str, Any],
    run_id: str | None = None,
    registry_ref: str | None = None,
) -> str:
    run_id = run_id or new_run_id()
    with engine.begin() as conn:
        conn.execute(
            eval_runs.insert().values(
                id=run_id,
                suite=suite,
                suite_version=version,
                suite_sha256=sha256,
                suite_path=path,
                model=model,
                registry_ref=registry_ref,
                samples=samples,
                cases_total=cases_total,
                params=params,
                status="running",
                created_at=datetime.now(UTC),
            )
        )
    return run_id


def get_run(engine: Engine, run_id: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(sa.select(eval_runs).where(eval_runs.c.id == run_id)).first()
    return dict(row._mapping) if row else None


# Read straight from the tables the registry writes: `registry` imports `evals` for its
# promotion gates, so `evals` must not import `registry` (tests/test_layers.py).
def served_ref(engine: Engine, settings: Any, alias: str) -> str | None:
    """The registry version `alias` serves now: the adapter deployed under it, else the one
    every config deployment of the alias declares (`registry:`); None if neither."""
    with engine.connect() as conn:
        adapter = conn.execute(
            sa.select(adapter_deployments.c.adapter).where(adapter_deployments.c.alias == alias)
        ).scalar()
    if adapter is not None:
        return str(adapter)
    model = settings.models.get(alias)
    refs = {d.registry for d in model.deployments} if model is not None else set()
    return refs.pop() if len(refs) == 1 and None not in refs else None


def adapter_alias(engine: Engine, ref: str) -> str | None:
    """An alias the adapter version `ref` is deployed under (serve preferred over staging)."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(adapter_deployments.c.alias, adapter_deployments.c.stage)
            .where(adapter_deployments.c.adapter == ref)
            .order_by(adapter_deployments.c.alias)
        ).all()
    rows.sort(key=lambda r: r.stage != "serve")
    return str(rows[0].alias) if rows else None


def latest_run(engine: Engine, registry_ref: str, suite_sha256: str) -> dict[str, Any] | None:
    """The newest finished run of this suite text (its SHA-256) on a registry version: what a
    promotion gate takes as evidence. Unfinished runs and runs of an edited suite do not count."""
    query = (
        sa.select(eval_runs)
        .where(
            eval_runs.c.registry_ref == registry_ref,
            eval_runs.c.suite_sha256 == suite_sha256,
            eval_runs.c.status == "finished",
        )
        .order_by(eval_runs.c.created_at.desc(), eval_runs.c.id)
        .limit(1)
    )
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return dict(row._mapping) if row else None


def set_status(engine: Engine, run_id: str, status: str) -> None:
    done = datetime.now(UTC) if status == "finished" else None
    with engine.begin() as conn:
        conn.execute(
            eval_runs.update()
            .where(eval_runs.c.id == run_id)
            .values(status=status, finished_at=done)
        )


def done_keys(engine: Engine, run_id: str) -> set[tuple[str, int]]:
    """(case id, sample) already answered; samples whose call failed are not done."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(eval_results.c.case_id, eval_results.c.sample, eval_results.c.error).where(
                eval_results.c.run_id == run_id
            )
        ).all()
    return {(r.case_id, r.sample) for r in rows if not (r.error or "").startswith(CALL_FAILED)}


def save_result(engine: Engine, run_id: str, row: dict[str, Any]) -> None:
    """One sample's result; replaces an earlier failed attempt at the same sample."""
    with engine.begin() as conn:
        conn.execute(
            eval_results.delete().where(
                eval_results.c.run_id == run_id,
                eval_results.c.case_id == row["case_id"],
                eval_results.c.sample == row["sample"],
            )
        )
        conn.execute(
            eval_results.insert().values(run_id=run_id, created_at=datetime.now(UTC), **row)
        )


def list_runs(engine: Engine, limit: int = 50) -> list[dict[str, Any]]:
    counts = (
        sa.select(
            eval_results.c.run_id,
            sa.func.count().label("done"),
            sa.func.sum(sa.case((eval_results.c.passed, 1), else_=0)).label("passed"),
        )
        .group_by(eval_results.c.run_id)
        .subquery()
    )
    q = (
        sa.select(eval_runs, counts.c.done, counts.c.passed)
        .outerjoin(counts, counts.c.run_id == eval_runs.c.id)
        .order_by(eval_runs.c.created_at.desc())
        .limit(limit)
    )
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def results(engine: Engine, run_id: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(eval_results)
            .where(eval_results.c.run_id == run_id)
            .order_by(eval_results.c.case_id, eval_results.c.sample)
        ).all()
    return [dict(r._mapping) for r in rows]


def attach_costs(engine: Engine, run_id: str, wait: float = 0.0) -> int:
    """Copies the cost of each call from the gateway's usage record (by x-request-id) into the
    run's results; the gateway writes usage in batches, so it may wait up to `wait` seconds for
    the last ones. Returns how many results still have no cost (an unpriced model stays so)."""
    deadline = time.monotonic() + wait
    while True:
        with engine.begin() as conn:
            missing = conn.execute(
                sa.select(
                    eval_results.c.case_id,
                    eval_results.c.sample,
                    usage.c.cost_micros,
                    usage.c.currency,
                )
                .outerjoin(usage, usage.c.request_id == eval_results.c.request_id)
                .where(
                    eval_results.c.run_id == run_id,
                    eval_results.c.cost_micros.is_(None),
                    eval_results.c.request_id.is_not(None),
                )
            ).all()
            left = 0
            for m in missing:
                if m.currency is None:  # no usage row yet, or no price for the model
                    left += 1
                    continue
                conn.execute(
                    eval_results.update()
                    .where(
                        eval_results.c.run_id == run_id,
                        eval_results.c.case_id == m.case_id,
                        eval_results.c.sample == m.sample,
                    )
                    .values(cost_micros=m.cost_micros, currency=m.currency)
                )
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)

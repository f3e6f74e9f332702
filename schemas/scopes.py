"""Scope ids: a child scope's id is the '/'-joined path from its tenant.

    tenant  acme
    team    acme/research
    project acme/research/chat
    agent   acme/research/chat/bot-1
    session acme/research/chat/bot-1/s-42

The path makes the hierarchy readable from the id alone, so a spend update or a
budget for any scope names all of its ancestors (a level left empty stays an empty
segment: a session with no team is acme//chat/bot-1/s-42).
"""
from __future__ import annotations

from meterline.schemas.events import SCOPES, Scope

SEP = "/"


def scope_ids(tenant_id: str, team: str = "", project: str = "", agent_id: str = "", session_id: str = "") -> dict[Scope, str]:
    """The id of every scope a call belongs to, tenant first; trailing empty levels are left out."""
    levels = [tenant_id, team, project, agent_id, session_id]
    while len(levels) > 1 and not levels[-1]:
        levels.pop()
    return {scope: SEP.join(levels[: depth + 1]) for depth, scope in enumerate(SCOPES[: len(levels)]) if levels[depth]}


def scope_of(scope_id: str) -> Scope:
    return SCOPES[min(scope_id.count(SEP), len(SCOPES) - 1)]


def lineage(scope_id: str) -> list[tuple[Scope, str]]:
    """(scope, id) of the scope and each of its ancestors, tenant first; empty levels skipped."""
    parts = scope_id.split(SEP)
    return [(SCOPES[d], SEP.join(parts[: d + 1])) for d in range(min(len(parts), len(SCOPES))) if parts[d]]


def tenant_of(scope_id: str) -> str:
    return scope_id.split(SEP, 1)[0]


def is_within(scope_id: str, ancestor_id: str) -> bool:
    return scope_id == ancestor_id or scope_id.startswith(ancestor_id + SEP)


def canonical(tenant_id: str, scope: Scope, scope_id: str) -> str:
    """A path id for any producer's id: paths stay; a bare id (e.g. 's-42' from a spend job that
    qualifies ids by tenant only) is placed at its level with unknown parents: 'acme////s-42'."""
    if scope == "tenant" or scope_id.startswith(tenant_id + SEP):
        return scope_id
    return tenant_id + SEP * SCOPES.index(scope) + scope_id


def level_key(scope_id: str) -> tuple[str, int, str]:
    """(tenant, depth, own id): the same scope whether its parents are known or not."""
    parts = scope_id.split(SEP)
    return parts[0], len(parts) - 1, parts[-1]


def bare(scope_id: str) -> str:
    """The id with its parents left unknown: what `canonical` makes of a bare id."""
    tenant, depth, own = level_key(scope_id)
    return tenant + SEP * depth + own if depth else tenant

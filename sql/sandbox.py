"""SQL from users (`meterline sql`, the API's /api/sql) in a sandbox that holds by construction.

ClickHouse itself parses the query: `formatQuerySingleLine` (a pure function of the text, so a
second statement is a syntax error, never run) gives one canonical statement, and `EXPLAIN AST`
of that text gives its syntax tree without analysing or running anything. (`EXPLAIN QUERY TREE`
would not do: the analyser folds constants, and `SELECT file('/etc/passwd')` came back in its
output.) The tree must be one SELECT (WITH, UNION and subqueries are fine) that reads only the
ledger's own database and a few harmless `system` tables, calls no table function but a short
allow-list, no function that reads files or dictionaries, and has no INTO OUTFILE, FORMAT or
SETTINGS clause. The canonical text, not the user's, is what then runs, under limits the query
cannot raise (it has no SETTINGS clause, and `readonly` forbids writes).
"""
from __future__ import annotations

import re
from typing import Any

from meterline.errors import first_line
from meterline.sql.ledger import ledger_views

TABLE_FUNCTIONS = frozenset({"numbers", "numbers_mt", "zeros", "zeros_mt", "generateSeries", "generate_series", "null"})
SYSTEM_TABLES = frozenset({"one", "numbers", "numbers_mt", "zeros", "tables", "columns", "functions", "time_zones",
                           "data_type_families", "parts"})
# Scalar functions that read the host or other stores (file contents, dictionaries over files, joins by name).
DENIED_FUNCTIONS = frozenset({"file", "joinGet", "joinGetOrNull", "filesystemAvailable", "filesystemFree",
                              "filesystemCapacity", "getServerSetting", "getMergeTreeSetting"})
DENIED_PREFIXES = ("dict",)
DENIED = frozenset(f.lower() for f in DENIED_FUNCTIONS)  # ClickHouse resolves some names case-insensitively


SELECT_ONLY = ("only SELECT queries run here (WITH, UNION and subqueries are fine); list tables with "
               "SELECT name FROM system.tables WHERE database = currentDatabase(), columns with "
               "SELECT name, type FROM system.columns WHERE table = 'priced_events' AND database = currentDatabase()")


class Refused(ValueError):
    """The query is not allowed in the sandbox; the message says why and what is."""


def vet(client: Any, query: str, parameters: dict[str, Any] | None = None) -> str:
    """The canonical text of `query` if it may run; raises Refused otherwise. `parameters` are the
    query's own ({name:Type} placeholders): the tree cannot be built without them."""
    try:
        canonical = client.query("SELECT formatQuerySingleLine({q:String})", parameters={"q": query}).result_rows[0][0]
    except Exception as err:  # noqa: BLE001 - a syntax error, or a second statement
        raise Refused(f"not one valid query: {first_line(err)}") from None
    try:  # in a subquery, so a FORMAT the client appends belongs to the outer SELECT, not to the tree
        lines = [row[0] for row in client.query(f"SELECT explain FROM (EXPLAIN AST {canonical})",
                                                parameters=parameters or {}).result_rows]
    except Exception as err:  # noqa: BLE001 - e.g. INTO OUTFILE or FORMAT, which a subquery cannot hold
        if "supports only SELECT" in str(err):  # SHOW, DESCRIBE, INSERT...: the subquery is what refused them
            raise Refused(SELECT_ONLY) from None
        raise Refused(f"not allowed here (INTO OUTFILE, FORMAT and SETTINGS never are): {first_line(err)}") from None
    check_tree(lines, database=client.query("SELECT currentDatabase()").result_rows[0][0])
    return canonical


def check_tree(lines: list[str], database: str) -> None:
    """Refuse anything in an EXPLAIN AST listing (one node per line, indented one space per level) that
    is not a plain read of the ledger."""
    if not lines or not lines[0].startswith("SelectWithUnionQuery"):
        raise Refused(SELECT_ONLY)
    stack: list[tuple[int, str]] = []
    for line in lines:
        depth, node = len(line) - len(line.lstrip(" ")), line.strip()
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        kind, _, rest = node.partition(" ")
        name = rest.split(" ", 1)[0]
        if kind == "SelectWithUnionQuery" and not rest.startswith("(children 1)"):
            raise Refused("INTO OUTFILE and FORMAT are not allowed: the caller chooses the output")
        if kind == "Set":
            raise Refused("a SETTINGS clause is not allowed: the sandbox's limits hold for every query")
        # the ledger's own parameterized views look like table functions in the tree; readonly cannot add one
        if kind == "Function" and parent.startswith("TableExpression") and name not in TABLE_FUNCTIONS | ledger_views():
            raise Refused(f"table function {name}() is not allowed (allowed: {', '.join(sorted(TABLE_FUNCTIONS | ledger_views()))})")
        if kind == "Function" and (name.lower() in DENIED or name.lower().startswith(DENIED_PREFIXES)):
            raise Refused(f"function {name}() reads outside the ledger and is not allowed")
        if kind == "TableIdentifier":
            _check_table(name, database)
        stack.append((depth, node))


def _check_table(name: str, database: str) -> None:
    db, _, table = name.rpartition(".")
    if db in ("", database) and "`" not in name:
        return
    if db == "system" and table in SYSTEM_TABLES:
        return
    raise Refused(f"table {name} is not the ledger's (its tables, and system.{{{', '.join(sorted(SYSTEM_TABLES))}}})")


def limits(settings: Any) -> dict[str, Any]:
    """What every sandboxed query runs under (the query has no SETTINGS clause to raise them)."""
    return {"readonly": 2, "max_execution_time": settings.sql_max_seconds, "max_memory_usage": settings.sql_max_memory_bytes,
            "max_result_rows": settings.sql_max_result_rows, "max_result_bytes": settings.sql_max_result_bytes,
            "result_overflow_mode": "throw", "max_rows_to_read": settings.sql_max_rows_to_read, "timeout_overflow_mode": "throw"}


def failure(err: BaseException) -> str:
    """What a user's query that the engine refused gets told: the engine's first line without the query echoed back
    (its SETTINGS are the sandbox's, not the user's), and for a missing table where to look."""
    text = re.split(r"(?<=[.?]) In scope ", first_line(err, None), maxsplit=1)[0][:300]
    if "UNKNOWN_TABLE" in str(err) or "Unknown table" in text:
        text += ("; the ledger's tables: SELECT name FROM system.tables WHERE database = currentDatabase() "
                 "(none: has `meterline migrate` run?)")
    return text

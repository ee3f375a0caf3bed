"""The schema, written once for every SQL dialect.

DDL uses ``{serial}``, ``{blob}``, ``{real}`` and ``{no_rowid}`` which each dialect fills
in; statements use ``?`` placeholders, which a dialect rewrites if its driver wants
another style. Bump ``SCHEMA_VERSION`` and append to ``MIGRATIONS`` to change it.
"""

from __future__ import annotations

SCHEMA_VERSION = 7

MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE TABLE IF NOT EXISTS ip_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        # Which consumer groups receive which routes (the store bus's fan-out table).
        """CREATE TABLE IF NOT EXISTS ip_routes (
            route TEXT NOT NULL, grp TEXT NOT NULL, ephemeral INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (route, grp)){no_rowid}""",
        # The store bus: one row per (message, group); leased by visible_at + lease token.
        """CREATE TABLE IF NOT EXISTS ip_queue (
            id {serial}, grp TEXT NOT NULL, msg_id TEXT NOT NULL, flow_id TEXT NOT NULL,
            body {blob} NOT NULL, visible_at {real} NOT NULL,
            deliveries INTEGER NOT NULL DEFAULT 0, lease TEXT)""",
        "CREATE INDEX IF NOT EXISTS ip_queue_ready ON ip_queue (grp, visible_at, id)",
        # The inbox: a message id handled by a group, with a command's stored reply.
        """CREATE TABLE IF NOT EXISTS ip_inbox (
            grp TEXT NOT NULL, msg_id TEXT NOT NULL, handled_at {real} NOT NULL, reply {blob},
            PRIMARY KEY (grp, msg_id)){no_rowid}""",
        "CREATE INDEX IF NOT EXISTS ip_inbox_time ON ip_inbox (handled_at)",
        # The outbox: messages committed but not yet confirmed by a broker.
        """CREATE TABLE IF NOT EXISTS ip_outbox (
            id {serial}, route TEXT NOT NULL, msg_id TEXT NOT NULL, body {blob} NOT NULL,
            created {real} NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS ip_dlq (
            id {serial}, msg_id TEXT NOT NULL, grp TEXT NOT NULL, route TEXT NOT NULL,
            type TEXT NOT NULL, flow_id TEXT, body {blob} NOT NULL, reason TEXT NOT NULL,
            error TEXT, attempts INTEGER NOT NULL, time {real} NOT NULL)""",
        # The trace: every published message, and every handling of one (a span).
        """CREATE TABLE IF NOT EXISTS ip_messages (
            id TEXT PRIMARY KEY, flow_id TEXT NOT NULL, causation_id TEXT, kind TEXT NOT NULL,
            type TEXT NOT NULL, source TEXT, time {real} NOT NULL, payload TEXT){no_rowid}""",
        "CREATE INDEX IF NOT EXISTS ip_messages_flow ON ip_messages (flow_id, type)",
        """CREATE TABLE IF NOT EXISTS ip_spans (
            id {serial}, flow_id TEXT NOT NULL, msg_id TEXT NOT NULL, service TEXT NOT NULL,
            handler TEXT, type TEXT NOT NULL, started {real} NOT NULL, ended {real} NOT NULL,
            outcome TEXT NOT NULL, error TEXT, attempt INTEGER NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS ip_spans_flow ON ip_spans (flow_id)",
        """CREATE TABLE IF NOT EXISTS ip_flows (
            flow_id TEXT PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL,
            declared INTEGER NOT NULL, started {real} NOT NULL, deadline {real},
            status TEXT NOT NULL, ended {real}, pending INTEGER NOT NULL DEFAULT 0,
            dead INTEGER NOT NULL DEFAULT 0, last_type TEXT, updated {real} NOT NULL){no_rowid}""",
        "CREATE INDEX IF NOT EXISTS ip_flows_started ON ip_flows (started)",
        # Workflows: runs (leased by orchestrators), their journal, and their waits.
        """CREATE TABLE IF NOT EXISTS ip_runs (
            run_id TEXT PRIMARY KEY, workflow TEXT NOT NULL, flow_id TEXT NOT NULL,
            parent_run TEXT, parent_seq INTEGER, status TEXT NOT NULL, input TEXT,
            result TEXT, error_type TEXT, error TEXT, owner TEXT, lease_until {real},
            ready_at {real}, cancel_requested INTEGER NOT NULL DEFAULT 0,
            created {real} NOT NULL, updated {real} NOT NULL){no_rowid}""",
        "CREATE INDEX IF NOT EXISTS ip_runs_ready ON ip_runs (status, ready_at)",
        """CREATE TABLE IF NOT EXISTS ip_journal (
            run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL,
            status TEXT NOT NULL, msg_id TEXT, data TEXT, error_type TEXT, error TEXT,
            started {real} NOT NULL, ended {real}, deadline {real},
            PRIMARY KEY (run_id, seq)){no_rowid}""",
        """CREATE TABLE IF NOT EXISTS ip_waits (
            run_id TEXT NOT NULL, seq INTEGER NOT NULL, flow_id TEXT NOT NULL,
            type TEXT NOT NULL, PRIMARY KEY (run_id, seq)){no_rowid}""",
        "CREATE INDEX IF NOT EXISTS ip_waits_flow ON ip_waits (flow_id, type)",
    ],
    # The stuck-flow watch: when a declared flow past its deadline was announced (the
    # event interplay.flow.stuck), so that of many watching processes only one does it.
    2: [
        "ALTER TABLE ip_flows ADD COLUMN stuck_at {real}",
        """CREATE INDEX IF NOT EXISTS ip_flows_overdue ON ip_flows (deadline)
            WHERE status = 'running' AND stuck_at IS NULL AND deadline IS NOT NULL""",
    ],
    # Fencing tokens for runs: every claim bumps the epoch, and every write in a run's
    # name must carry the epoch it was claimed with. Owner ids alone are not enough:
    # an orchestrator can lose a run and claim it back while its old execution still
    # has writes in flight.
    3: [
        "ALTER TABLE ip_runs ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
    ],
    # The route a queue row came by: a message that is not even an envelope is
    # dead-lettered with it (and replayed by it on a broker).
    4: [
        "ALTER TABLE ip_queue ADD COLUMN route TEXT",
    ],
    # Leases per orchestrator, not per run: a heartbeat writes one row, instead of
    # every run it holds (which on PostgreSQL row-locked against the steps' fences).
    # A run is claimable when its owner's lease lapsed; ip_runs.lease_until is now
    # only the lease its last claim got.
    5: [
        "CREATE TABLE IF NOT EXISTS ip_leases (owner TEXT PRIMARY KEY, lease_until {real} NOT NULL){no_rowid}",
    ],
    # Outbox rows are claimed by one relay loop at a time, and retried with backoff:
    # relay_after is when a row may be taken next (NULL: outbox_grace after created,
    # the time its writer has to publish it), attempts how often a relay loop took it.
    # Without a claim every process republished every leftover row.
    6: [
        "ALTER TABLE ip_outbox ADD COLUMN relay_after {real}",
        "ALTER TABLE ip_outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX IF NOT EXISTS ip_outbox_due ON ip_outbox (relay_after)",
    ],
    # Whether a dead letter counts in its flow's pending/dead: not one a broker gave up on
    # that no service of the app ever held (dispatch.record_abandoned) - replaying or
    # restoring it must not count it either.
    7: [
        "ALTER TABLE ip_dlq ADD COLUMN counted INTEGER NOT NULL DEFAULT 1",
    ],
}

# A flow's status, computed from its record. Declared flows end by their events or go
# stuck after `within`; an undeclared flow is done when nothing of it is left pending.
# A choreographed flow with a message in the DLQ has failed (until the message is
# replayed); a workflow's flow has its run's status.
FLOW_STATUS = """CASE
    WHEN status <> 'running' THEN status
    WHEN kind = 'flow' AND dead > 0 THEN 'failed'
    WHEN declared = 0 AND pending <= 0 THEN 'completed'
    WHEN deadline IS NOT NULL AND deadline < ? THEN 'stuck'
    ELSE 'running' END"""

FLOW_COLUMNS = (
    "flow_id, name, kind, declared, started, deadline, " + FLOW_STATUS
    + " AS status, ended, pending, dead, last_type, updated"
)

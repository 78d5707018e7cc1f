-- chatterd's schema. Applied at every start, in one transaction; every statement is
-- idempotent, and a tutorial-era database is migrated in place without losing a row.

-- Two workers starting at once must not run this DDL side by side.
SELECT pg_advisory_xact_lock(7305275628);

-- The tutorial's table. Its 2026 edition calls the role column `name` instead of
-- `username`: a table that already exists keeps its spelling, and chatterd uses whichever
-- it has. `time` stays for the tutorial's sake; order comes from `seq` (below).
CREATE TABLE IF NOT EXISTS chatts (
    username    varchar(255) NOT NULL,
    message     text NOT NULL DEFAULT '',
    id          uuid NOT NULL DEFAULT gen_random_uuid(),
    time        timestamp NOT NULL DEFAULT now(),
    appid       varchar(155),
    toolcalls   text,
    toolschemas text
);

-- Older tutorial editions lack the later columns.
ALTER TABLE chatts ADD COLUMN IF NOT EXISTS appid varchar(155);
ALTER TABLE chatts ADD COLUMN IF NOT EXISTS toolcalls text;
ALTER TABLE chatts ADD COLUMN IF NOT EXISTS toolschemas text;
-- What chatterd adds: the model's thinking, kept apart from the reply and never sent back,
-- and the tool a `tool` message answers.
ALTER TABLE chatts ADD COLUMN IF NOT EXISTS thinking text;
ALTER TABLE chatts ADD COLUMN IF NOT EXISTS toolname text;
-- Rows of a turn still in progress: not part of the conversation until the turn completes,
-- so a turn cut off by a crash or a kill leaves no trace in the history.
ALTER TABLE chatts ADD COLUMN IF NOT EXISTS pending boolean NOT NULL DEFAULT false;

-- `seq` orders messages: rows written in one transaction share now(), so `time` cannot.
-- Existing rows are numbered once, by time and then by their order on disk.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'chatts' AND column_name = 'seq'
    ) THEN
        ALTER TABLE chatts ADD COLUMN seq bigint;
        UPDATE chatts SET seq = numbered.n
          FROM (SELECT ctid AS row_id, row_number() OVER (ORDER BY time, ctid) AS n
                  FROM chatts) AS numbered
         WHERE chatts.ctid = numbered.row_id;
        CREATE SEQUENCE chatts_seq_seq OWNED BY chatts.seq;
        PERFORM setval('chatts_seq_seq', coalesce((SELECT max(seq) FROM chatts), 0) + 1, false);
        ALTER TABLE chatts
            ALTER COLUMN seq SET DEFAULT nextval('chatts_seq_seq'),
            ALTER COLUMN seq SET NOT NULL;
    END IF;
END
$$;

CREATE INDEX IF NOT EXISTS chatts_appid_seq ON chatts (appid, seq);
-- Finds a dead turn's rows without reading the whole conversation.
CREATE INDEX IF NOT EXISTS chatts_pending ON chatts (appid) WHERE pending;
-- Finds a conversation's system messages (always sent) without reading all its rows; on
-- whichever role column the table has.
DO $$
DECLARE
    role_column text := (
        SELECT column_name FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'chatts'
          AND column_name IN ('username', 'name')
        ORDER BY column_name DESC LIMIT 1);
BEGIN
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS chatts_system ON chatts (appid, seq) WHERE %I = %L',
        role_column, 'system');
END
$$;

-- How many messages each conversation has stored, kept as turns complete, so that telling
-- how much of a long history was left out does not count its rows every time.
CREATE TABLE IF NOT EXISTS conversation_sizes (
    appid    varchar(155) PRIMARY KEY,
    messages bigint NOT NULL
);

-- The tools each app has declared on /llmtools, one row per name: the latest wins.
CREATE TABLE IF NOT EXISTS device_tools (
    appid       varchar(155) NOT NULL,
    name        text NOT NULL,
    declaration jsonb NOT NULL,
    PRIMARY KEY (appid, name)
);

-- One writer per conversation: a turn holds its appID's lease, a session-level advisory
-- lock on its worker's lock connection, which PostgreSQL lets go when that session ends
-- (leases.py). The appID's row counts the turns that took the lease (`replies`), which
-- numbers their stream events; `holder` is the worker that took it last. (`expires` is
-- what the leases of earlier versions ran out by.)
CREATE TABLE IF NOT EXISTS conversation_leases (
    appid   varchar(155) PRIMARY KEY,
    holder  uuid NOT NULL,
    expires timestamptz NOT NULL
);
ALTER TABLE conversation_leases ADD COLUMN IF NOT EXISTS replies bigint NOT NULL DEFAULT 0;

-- The advisory lock of an appID's lease (per schema, so that chatterds on other schemas of
-- the same database don't share locks), and whether any session holds it.
CREATE OR REPLACE FUNCTION chatterd_lease_key(appid text) RETURNS bigint
    LANGUAGE sql STABLE
    AS $$ SELECT hashtextextended(current_schema() || ' ' || appid, 7305275628) $$;
CREATE OR REPLACE FUNCTION chatterd_lease_held(appid text) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$
        SELECT EXISTS (
            SELECT 1 FROM pg_locks
            WHERE locktype = 'advisory' AND granted AND objsubid = 1
              AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
              AND classid = ((chatterd_lease_key(appid) >> 32) & 4294967295)::oid
              AND objid = (chatterd_lease_key(appid) & 4294967295)::oid
        )
    $$;

-- Every SSE event of the recent replies, so that a client that lost its stream can resume
-- it from any worker (events.py). An `end` row marks a reply's end. Kept for
-- CHATTERD_EVENTS_KEEP seconds. Unlogged: no write-ahead log for the busiest table (a
-- quarter less of PostgreSQL's time per event); a crash of PostgreSQL empties it, and a
-- standby does not have it, which costs only the resuming of replies from before.
CREATE UNLOGGED TABLE IF NOT EXISTS stream_events (
    appid   varchar(155) NOT NULL,
    id      bigint NOT NULL,
    event   text,
    data    bytea NOT NULL,
    created timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (appid, id)
);
DO $$
BEGIN
    IF (SELECT relpersistence FROM pg_class WHERE oid = 'stream_events'::regclass) = 'p' THEN
        ALTER TABLE stream_events SET UNLOGGED;  -- made by an earlier chatterd
    END IF;
EXCEPTION WHEN others THEN  -- in a publication, say: it works as well logged
    RAISE WARNING 'stream_events stays logged: %', SQLERRM;
END
$$;
CREATE INDEX IF NOT EXISTS stream_events_created ON stream_events (created);

-- turnid PostgreSQL schema, version 1. Forward-only: later changes go in 0002_*.sql and so on;
-- a file that has been released is never edited. Every key starts with thread_id, so a
-- thread's rows stay together (the property that lets the store shard by thread_id).

-- One row per thread: its counters. The allocating transaction updates (and so row-locks) it
-- first, which serializes allocations within a thread while other threads run in parallel.
CREATE TABLE threads (
    thread_id       TEXT NOT NULL,
    next_sequence   BIGINT NOT NULL,
    next_compaction BIGINT NOT NULL,
    CONSTRAINT threads_pkey PRIMARY KEY (thread_id)
);

CREATE TABLE turns (
    thread_id      TEXT NOT NULL,
    sequence       BIGINT NOT NULL,
    turn_id        TEXT NOT NULL,
    kind           SMALLINT NOT NULL,
    request_id     TEXT NOT NULL,
    claimed        BOOLEAN NOT NULL,
    create_time_us BIGINT NOT NULL,
    CONSTRAINT turns_pkey PRIMARY KEY (thread_id, sequence),
    CONSTRAINT turns_thread_id_turn_id_key UNIQUE (thread_id, turn_id)
);

-- Requests that carried a request_id (AIP-155): what they asked for and where their turns start.
CREATE TABLE requests (
    thread_id       TEXT NOT NULL,
    request_id      TEXT NOT NULL,
    kind            SMALLINT NOT NULL,
    count           INTEGER NOT NULL,
    claimed_turn_id TEXT,
    first_sequence  BIGINT NOT NULL,
    CONSTRAINT requests_pkey PRIMARY KEY (thread_id, request_id)
);

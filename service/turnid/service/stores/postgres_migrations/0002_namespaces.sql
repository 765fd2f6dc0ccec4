-- turnid PostgreSQL schema, version 2: namespaces lead every key, and the thread row carries
-- what the allocation decision (domain.allocation.decide) needs at the thread's lock: the
-- greatest id turnid minted in the thread (invariant 8), the greatest claimed id, and the
-- thread's create and update times. Existing rows move to the default namespace ''.
--
-- Text comparisons that must agree with the service (Python compares code points, i.e. UTF-8
-- bytes) use COLLATE "C"; the database's default collation may sort otherwise.

ALTER TABLE threads
    ADD COLUMN namespace      TEXT   NOT NULL DEFAULT '',
    ADD COLUMN last_minted    TEXT   NOT NULL DEFAULT '',
    ADD COLUMN max_claimed    TEXT   NOT NULL DEFAULT '',
    ADD COLUMN create_time_us BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN update_time_us BIGINT NOT NULL DEFAULT 0;
ALTER TABLE turns ADD COLUMN namespace TEXT NOT NULL DEFAULT '';
ALTER TABLE requests ADD COLUMN namespace TEXT NOT NULL DEFAULT '';

-- Version 1 minted UUIDv7s for every unclaimed turn that is not a compaction (kind 2).
UPDATE threads AS t SET
    last_minted = COALESCE(s.last_minted, ''),
    max_claimed = COALESCE(s.max_claimed, ''),
    create_time_us = COALESCE(s.create_time_us, 0),
    update_time_us = COALESCE(s.update_time_us, 0)
FROM (
    SELECT thread_id,
           max(turn_id COLLATE "C") FILTER (WHERE NOT claimed AND kind <> 2) AS last_minted,
           max(turn_id COLLATE "C") FILTER (WHERE claimed) AS max_claimed,
           min(create_time_us) AS create_time_us,
           max(create_time_us) AS update_time_us
    FROM turns
    GROUP BY thread_id
) AS s
WHERE s.thread_id = t.thread_id;

-- Every write names the namespace: no defaults left to hide a missing one.
ALTER TABLE threads
    ALTER COLUMN namespace DROP DEFAULT,
    ALTER COLUMN last_minted DROP DEFAULT,
    ALTER COLUMN max_claimed DROP DEFAULT,
    ALTER COLUMN create_time_us DROP DEFAULT,
    ALTER COLUMN update_time_us DROP DEFAULT,
    DROP CONSTRAINT threads_pkey,
    ADD CONSTRAINT threads_pkey PRIMARY KEY (namespace, thread_id);

ALTER TABLE turns
    ALTER COLUMN namespace DROP DEFAULT,
    DROP CONSTRAINT turns_pkey,
    DROP CONSTRAINT turns_thread_id_turn_id_key,
    ADD CONSTRAINT turns_pkey PRIMARY KEY (namespace, thread_id, sequence),
    ADD CONSTRAINT turns_turn_id_key UNIQUE (namespace, thread_id, turn_id);

ALTER TABLE requests
    ALTER COLUMN namespace DROP DEFAULT,
    DROP CONSTRAINT requests_pkey,
    ADD CONSTRAINT requests_pkey PRIMARY KEY (namespace, thread_id, request_id);

-- pg_nudge 0.9.0 -> 0.10.0: pg_nudge on a Citus cluster (docs/citus.md).
-- The outbox protocol loses its FOR UPDATE (a Citus cluster routes those to
-- one shard only), claim's statements move to src/claim.rs (where they run
-- on each shard group of a node too), and nudge.distribute() arrives.

CREATE FUNCTION nudge."_claim_here"(
	"batch" INT, /* i32 */
	"lease" interval, /* Interval */
	"consumer" TEXT /* Option < & str > */
) RETURNS jsonb /* JsonB */
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_claim_here_wrapper';

-- Per-user tables: distributed by user_id, co-located with nudge.events, so
-- that one shard of each covers the same users on the same node.
CREATE FUNCTION nudge._per_user_tables() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['nudge.events', 'nudge.enrollments', 'nudge.journal', 'nudge.outbox',
                 'nudge.capture_queue', 'nudge.segment_members', 'nudge.profiles']
$$;

-- Definitions and shared state: a copy on every node (reference tables).
CREATE FUNCTION nudge._shared_tables() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['nudge.triggers', 'nudge.trigger_versions', 'nudge.templates', 'nudge.settings',
                 'nudge.suppressions', 'nudge.subscriptions', 'nudge.sources', 'nudge.user_sql',
                 'nudge.allocations', 'nudge.secrets', 'nudge.received']
$$;

-- 'single' (no Citus, or nudge.events not distributed), 'coordinator', or 'node'.
CREATE FUNCTION nudge._placement() RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    distributed boolean;
    grp int;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RETURN 'single';
    END IF;
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1)'
       INTO distributed USING 'nudge.events'::regclass;
    IF NOT distributed THEN
        RETURN 'single';
    END IF;
    EXECUTE 'SELECT groupid FROM pg_catalog.pg_dist_local_group' INTO grp;
    RETURN CASE WHEN grp = 0 THEN 'coordinator' ELSE 'node' END;
END
$$;

-- This node's shards of our tables (and of tables co-located with
-- nudge.events): the table as our statements name it, the local shard, and
-- the shard's hash range (NULL for a reference table, whose one shard every
-- node holds).
CREATE FUNCTION nudge._local_shards() RETURNS TABLE (t text, shard text, range bigint)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF nudge._placement() = 'single' THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE $q$
        SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname),
               quote_ident(n.nspname) || '.' || quote_ident(c.relname || '_' || s.shardid),
               CASE WHEN d.partmethod = 'h' THEN s.shardminvalue::bigint END
          FROM pg_catalog.pg_dist_partition d
          JOIN pg_catalog.pg_class c ON c.oid = d.logicalrelid
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_catalog.pg_dist_shard s ON s.logicalrelid = d.logicalrelid
          JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid
         WHERE p.groupid = (SELECT groupid FROM pg_catalog.pg_dist_local_group)
           AND (d.partmethod = 'n' AND n.nspname = 'nudge'
                OR d.partmethod = 'h' AND d.colocationid =
                   (SELECT colocationid FROM pg_catalog.pg_dist_partition
                     WHERE logicalrelid = 'nudge.events'::regclass))
         ORDER BY 3, 1 $q$;
END
$$;

-- The hash range of the shard with this oid, when it is a shard of a table
-- co-located with nudge.events on this node.
CREATE FUNCTION nudge._shard_range(relid oid) RETURNS bigint
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r bigint;
BEGIN
    SELECT l.range INTO r
      FROM nudge._local_shards() l
     WHERE l.range IS NOT NULL AND l.shard::regclass = relid;
    RETURN r;
END
$$;

-- The nodes that hold shards of nudge.events (the coordinator too, when it
-- was given shards).
CREATE FUNCTION nudge._nodes() RETURNS TABLE (name text, port int)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY EXECUTE $q$
        SELECT DISTINCT n.nodename::text, n.nodeport::int
          FROM pg_catalog.pg_dist_shard s
          JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid
          JOIN pg_catalog.pg_dist_node n ON n.groupid = p.groupid AND n.noderole = 'primary'
         WHERE s.logicalrelid = 'nudge.events'::regclass
         ORDER BY 1, 2 $q$;
END
$$;

-- Runs `command` on every node of nudge._nodes(), each in a transaction of
-- its own (Citus's master_run_on_worker, as the current role), and returns
-- each node's one-value result. A node's error is raised here.
CREATE FUNCTION nudge._on_nodes(command text) RETURNS SETOF text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
BEGIN
    FOR r IN EXECUTE $q$
        SELECT w.node_name, w.node_port, w.success, w.result
          FROM pg_catalog.master_run_on_worker(
                   (SELECT array_agg(name) FROM nudge._nodes()),
                   (SELECT array_agg(port) FROM nudge._nodes()),
                   (SELECT array_agg($1) FROM nudge._nodes()),
                   true) w $q$ USING command
    LOOP
        IF NOT r.success THEN
            RAISE EXCEPTION 'pg_nudge: on node %:%: %', r.node_name, r.node_port, r.result;
        END IF;
        RETURN NEXT r.result;
    END LOOP;
END
$$;

-- Gives this node's id sequences a range of their own, as Citus gives its
-- sequences (the node's group id << 48): our statements write the shards
-- directly and draw ids from these sequences, and ids must not repeat across
-- nodes (nudge.ack(id)). The worker of each node runs it before each pass;
-- nudge.distribute() on every node at once.
CREATE FUNCTION nudge._prepare_node() RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    grp bigint;
    tbl text;
    seq regclass;
    n int := 0;
BEGIN
    -- not nudge._placement(): nudge.distribute() runs this before the
    -- distribution commits, when the nodes do not see it yet
    IF to_regclass('pg_catalog.pg_dist_local_group') IS NULL THEN
        RETURN 0;
    END IF;
    EXECUTE 'SELECT groupid FROM pg_catalog.pg_dist_local_group' INTO grp;
    IF grp = 0 THEN
        RETURN 0;
    END IF;
    FOREACH tbl IN ARRAY ARRAY['events', 'enrollments', 'journal', 'outbox'] LOOP
        seq := format('nudge.%s_id_seq', tbl)::regclass;
        IF coalesce(pg_sequence_last_value(seq), 0) < grp << 48 THEN
            PERFORM setval(seq, grp << 48, false);
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
END
$$;

-- Distributes pg_nudge's tables over a Citus cluster (docs/citus.md). Run on
-- the coordinator after CREATE EXTENSION citus and citus_add_node; running it
-- again (after adding nodes and rebalancing) only prepares the nodes anew.
-- Rows already in the tables move to the nodes.
CREATE FUNCTION nudge.distribute(shard_count int DEFAULT NULL)
RETURNS TABLE (table_name text, kind text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t text;
    known boolean;
BEGIN
    IF to_regclass('pg_catalog.pg_dist_partition') IS NULL THEN
        RAISE EXCEPTION 'distribute: Citus is not installed in this database'
            USING ERRCODE = '55000', HINT = 'CREATE EXTENSION citus first (docs/citus.md)';
    END IF;
    IF nudge._placement() = 'node' THEN
        RAISE EXCEPTION 'distribute: this is a worker node; run it on the coordinator' USING ERRCODE = '55000';
    END IF;
    IF current_setting('citus.enable_unsafe_triggers', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'distribute: capture runs as triggers on the shards, which Citus allows only with citus.enable_unsafe_triggers = on'
            USING ERRCODE = '55000', HINT = 'set it in postgresql.conf of every node (docs/citus.md)';
    END IF;
    IF shard_count IS NOT NULL AND shard_count < 1 THEN
        RAISE EXCEPTION 'distribute: shard_count must be positive, got %', shard_count USING ERRCODE = '22023';
    END IF;
    IF EXISTS (SELECT 1 FROM nudge.trigger_versions v JOIN nudge.triggers t ON t.name = v.trigger AND t.version = v.version
                WHERE v.definition ? 'segment' OR v.definition->'on'->>'date' LIKE 'profile.%') THEN
        RAISE EXCEPTION 'distribute: segment triggers do not run on a cluster yet'
            USING ERRCODE = '0A000', HINT = 'drop them first (docs/citus.md, "Not yet")';
    END IF;
    -- the unsubscribe key, made once here: a node's pass reads its copy
    INSERT INTO nudge.secrets (name, value)
    VALUES ('unsubscribe', decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'))
    ON CONFLICT (name) DO NOTHING;
    FOREACH t IN ARRAY nudge._shared_tables() LOOP
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1)'
           INTO known USING t::regclass;
        IF NOT known THEN
            EXECUTE 'SELECT pg_catalog.create_reference_table($1)' USING t::regclass;
            EXECUTE 'SELECT pg_catalog.truncate_local_data_after_distributing_table($1)' USING t::regclass;
        END IF;
        table_name := t; kind := 'reference'; RETURN NEXT;
    END LOOP;
    FOREACH t IN ARRAY nudge._per_user_tables() LOOP
        EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1)'
           INTO known USING t::regclass;
        IF NOT known AND t = 'nudge.events' THEN
            EXECUTE 'SELECT pg_catalog.create_distributed_table($1, ''user_id'', shard_count => $2)'
              USING t::regclass, coalesce(shard_count, current_setting('citus.shard_count')::int);
        ELSIF NOT known THEN
            EXECUTE 'SELECT pg_catalog.create_distributed_table($1, ''user_id'', colocate_with => ''nudge.events'')'
              USING t::regclass;
        END IF;
        IF NOT known THEN
            -- the rows were copied to the shards; the coordinator's copy is dead weight
            EXECUTE 'SELECT pg_catalog.truncate_local_data_after_distributing_table($1)' USING t::regclass;
        END IF;
        table_name := t; kind := 'distributed by user_id'; RETURN NEXT;
    END LOOP;
    PERFORM nudge._on_nodes('SELECT nudge._prepare_node()');
END
$$;

-- Claims up to `batch` messages, in priority order, leased for `lease`. The
-- statements are src/claim.rs's (docs/reference.md, "Claim"): there they run
-- on each shard group of a Citus node as well as on a single server. On a
-- Citus coordinator every node claims its share of the batch from its own
-- shards, each node in a transaction of its own (docs/citus.md).
CREATE OR REPLACE FUNCTION nudge.claim(batch int DEFAULT 10, lease interval DEFAULT '5 minutes', consumer text DEFAULT NULL)
RETURNS SETOF nudge.outbox
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    share int;
BEGIN
    IF nudge._placement() = 'coordinator' THEN
        share := ceil(greatest(coalesce(batch, 0), 0)::numeric / greatest((SELECT count(*) FROM nudge._nodes()), 1));
        RETURN QUERY
            SELECT m.*
              FROM nudge._on_nodes(format('SELECT nudge._claim_here(%s, %L, %L)', share, coalesce(lease, interval '0'), consumer)) r,
                   jsonb_populate_recordset(NULL::nudge.outbox, r::jsonb) m
             LIMIT greatest(coalesce(batch, 0), 0);
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM jsonb_populate_recordset(NULL::nudge.outbox, nudge._claim_here(coalesce(batch, 0), coalesce(lease, interval '0'), consumer));
END
$$;

CREATE OR REPLACE FUNCTION nudge.ack(id bigint, provider_message_id text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text;
BEGIN
    -- the update takes the row lock and re-reads the status after a
    -- concurrent ack; no FOR UPDATE, which Citus routes to one shard only
    UPDATE nudge.outbox o
       SET status = 'sent', sent_at = now(), provider_message_id = ack.provider_message_id, last_error = NULL
     WHERE o.id = ack.id AND o.status = 'claimed';
    IF FOUND THEN
        RETURN true;
    END IF;
    SELECT o.status INTO st FROM nudge.outbox o WHERE o.id = ack.id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'ack: no message with id %', ack.id;
    ELSIF st = 'sent' THEN
        RETURN false;
    END IF;
    RAISE EXCEPTION 'ack: message % is %, not claimed (claim it first)', ack.id, st;
END
$$;

CREATE OR REPLACE FUNCTION nudge.fail(id bigint, error text, permanent boolean DEFAULT false) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    base float8 := nudge._setting('nudge.retry_base_seconds', '30')::float8;
    cap float8 := nudge._setting('nudge.retry_max_seconds', '3600')::float8;
    max_attempts int := nudge._setting('nudge.max_attempts', '5')::int;
    -- equal jitter: half the delay fixed, half random, so that a burst of
    -- failures does not retry in lockstep (drawn here: Citus refuses a
    -- volatile function inside an UPDATE of a distributed table)
    jitter float8 := random();
    st text;
BEGIN
    -- one statement that takes the row lock and re-reads it (no FOR UPDATE,
    -- which Citus routes to one shard only); exponential backoff, capped
    UPDATE nudge.outbox o
       SET status = CASE WHEN permanent OR o.attempts >= max_attempts THEN 'dead' ELSE 'pending' END,
           last_error = fail.error,
           available_at = CASE WHEN permanent OR o.attempts >= max_attempts THEN o.available_at
                               ELSE now() + least(cap, base * 2 ^ (o.attempts - 1)) * (0.5 + jitter / 2) * interval '1 second' END
     WHERE o.id = fail.id AND o.status = 'claimed'
    RETURNING o.status INTO st;
    IF FOUND THEN
        RETURN st;
    END IF;
    SELECT o.status INTO st FROM nudge.outbox o WHERE o.id = fail.id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'fail: no message with id %', fail.id;
    END IF;
    RAISE EXCEPTION 'fail: message % is %, not claimed', fail.id, st;
END
$$;

CREATE OR REPLACE FUNCTION nudge.outbox_metrics()
RETURNS TABLE (status text, messages bigint, oldest_age interval)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    -- oldest_age: how long the oldest message in that status has existed;
    -- the outbox is aggregated first, which Citus does on every node
    SELECT s.status, coalesce(o.messages, 0), now() - o.oldest
      FROM unnest(ARRAY['pending', 'claimed', 'sent', 'dead', 'cancelled']) WITH ORDINALITY AS s(status, place)
      LEFT JOIN (SELECT o.status, count(*) AS messages, min(o.created_at) AS oldest
                   FROM nudge.outbox o GROUP BY o.status) o ON o.status = s.status
     ORDER BY s.place
$$;

-- a cluster's (docs/citus.md): claim's part on a node hands messages out;
-- distribute and the nodes' set-up are a superuser's
REVOKE EXECUTE ON FUNCTION nudge._claim_here(int, interval, text), nudge.distribute(int),
    nudge._prepare_node(), nudge._on_nodes(text) FROM nudge_admin;
REVOKE EXECUTE ON FUNCTION nudge._claim_here(int, interval, text), nudge.distribute(int),
    nudge._prepare_node(), nudge._on_nodes(text), nudge._placement(), nudge._local_shards(),
    nudge._shard_range(oid), nudge._nodes(), nudge._per_user_tables(), nudge._shared_tables() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge._placement(), nudge._local_shards(), nudge._shard_range(oid), nudge._nodes(),
    nudge._per_user_tables(), nudge._shared_tables() TO nudge_admin;

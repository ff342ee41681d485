-- pg_nudge on a Citus cluster (docs/citus.md). Citus is optional: nothing
-- here names a Citus object outside dynamic SQL, and every function answers
-- for a single server when Citus is absent or our tables are not distributed.

-- Per-user tables: distributed by user_id, co-located with nudge.events, so
-- that one shard of each covers the same users on the same node.
CREATE FUNCTION nudge._per_user_tables() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['nudge.events', 'nudge.enrollments', 'nudge.journal', 'nudge.outbox',
                 'nudge.capture_queue', 'nudge.segment_members', 'nudge.profiles']
$$;

-- Definitions and shared state: a copy on every node (reference tables).
-- Not nudge.sources, whose regclass column Citus would copy to the nodes as
-- the coordinator's oids: each node keeps its own (nudge.events only).
CREATE FUNCTION nudge._shared_tables() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['nudge.triggers', 'nudge.trigger_versions', 'nudge.templates', 'nudge.settings',
                 'nudge.suppressions', 'nudge.subscriptions', 'nudge.user_sql',
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

-- This node's shards of our tables and of the sources registered here: the
-- table as our statements name it, the local shard (named by Citus, which
-- shortens long names), and the shard's hash range (NULL for a reference
-- table, whose one shard every node holds). No other table: any table
-- distributed on a text column is co-located with nudge.events by default,
-- and its name must not turn into a shard's in our statements.
CREATE FUNCTION nudge._local_shards() RETURNS TABLE (t text, shard text, range bigint)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF nudge._placement() = 'single' THEN
        RETURN;
    END IF;
    RETURN QUERY EXECUTE $q$
        SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname),
               -- shard_name() leaves schema public out: the path is pinned
               quote_ident(n.nspname) || '.' || quote_ident((SELECT x[array_upper(x, 1)]
                  FROM pg_catalog.parse_ident(pg_catalog.shard_name(d.logicalrelid, s.shardid)) x)),
               CASE WHEN d.partmethod = 'h' THEN s.shardminvalue::bigint END
          FROM pg_catalog.pg_dist_partition d
          JOIN pg_catalog.pg_class c ON c.oid = d.logicalrelid
          JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_catalog.pg_dist_shard s ON s.logicalrelid = d.logicalrelid
          JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid
         WHERE p.groupid = (SELECT groupid FROM pg_catalog.pg_dist_local_group)
           AND (n.nspname = 'nudge' OR d.logicalrelid IN (SELECT s.source FROM nudge.sources s))
           AND (d.partmethod = 'n'
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
-- was given shards), and which of them is this one.
CREATE FUNCTION nudge._nodes() RETURNS TABLE (name text, port int, here boolean)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY EXECUTE $q$
        SELECT DISTINCT n.nodename::text, n.nodeport::int,
               n.groupid = (SELECT groupid FROM pg_catalog.pg_dist_local_group)
          FROM pg_catalog.pg_dist_shard s
          JOIN pg_catalog.pg_dist_placement p ON p.shardid = s.shardid
          JOIN pg_catalog.pg_dist_node n ON n.groupid = p.groupid AND n.noderole = 'primary'
         WHERE s.logicalrelid = 'nudge.events'::regclass
         ORDER BY 1, 2 $q$;
END
$$;

-- Runs commands[i] on the i-th node of nudge._nodes() (all of them, in
-- parallel; none where commands[i] is NULL), each in a transaction of its own (Citus's master_run_on_worker,
-- as the current role), and returns each node's one-value result. A node's
-- error is raised here, or, when `strict` is false, reported as a warning
-- and its result left out (a claim must not lose what the other nodes
-- committed because one node is down).
CREATE FUNCTION nudge._on_nodes(commands text[], strict boolean DEFAULT true) RETURNS SETOF text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
BEGIN
    FOR r IN EXECUTE $q$
        WITH nodes AS (SELECT n.name, n.port, $1[row_number() OVER (ORDER BY n.name, n.port)] AS command
                         FROM nudge._nodes() n)
        SELECT w.node_name, w.node_port, w.success, w.result
          FROM pg_catalog.master_run_on_worker(
                   (SELECT array_agg(name ORDER BY name, port) FROM nodes WHERE command IS NOT NULL),
                   (SELECT array_agg(port ORDER BY name, port) FROM nodes WHERE command IS NOT NULL),
                   (SELECT array_agg(command ORDER BY name, port) FROM nodes WHERE command IS NOT NULL),
                   true) w $q$ USING commands
    LOOP
        IF NOT r.success AND strict THEN
            RAISE EXCEPTION 'pg_nudge: on node %:%: %', r.node_name, r.node_port, r.result;
        ELSIF NOT r.success THEN
            RAISE WARNING 'pg_nudge: on node %:%: %', r.node_name, r.node_port, r.result;
        ELSE
            RETURN NEXT r.result;
        END IF;
    END LOOP;
END
$$;

-- `total` split over the nodes of nudge._nodes(), in their order, as evenly as
-- it goes (the first nodes get one more).
CREATE FUNCTION nudge._node_shares(total bigint) RETURNS bigint[]
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT array_agg(total / n.count + CASE WHEN i <= total % n.count THEN 1 ELSE 0 END ORDER BY i)
      FROM (SELECT count(*) AS count FROM nudge._nodes()) n, generate_series(1, n.count) i
$$;

-- Whether `t` is distributed (or a reference table) by Citus.
CREATE FUNCTION nudge._is_distributed(t regclass) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    known boolean;
BEGIN
    EXECUTE 'SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1)'
       INTO known USING t;
    RETURN known;
END
$$;

-- Whether `source` is distributed by `user_column`, co-located with
-- nudge.events: then its shard i holds the same users as ours and is
-- captured on its node like events (docs/citus.md, "Your own tables").
CREATE FUNCTION nudge._colocated_source(source regclass, user_column text) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ok boolean;
BEGIN
    EXECUTE $q$
        SELECT EXISTS (
            SELECT 1 FROM pg_catalog.pg_dist_partition d
             WHERE d.logicalrelid = $1 AND d.partmethod = 'h'
               AND pg_catalog.column_to_column_name(d.logicalrelid, d.partkey) = $2
               AND d.colocationid = (SELECT colocationid FROM pg_catalog.pg_dist_partition
                                      WHERE logicalrelid = 'nudge.events'::regclass)) $q$
       INTO ok USING source, user_column;
    RETURN ok;
END
$$;

-- A node's own registration of a source (nudge.sources is per node: its
-- regclass is each node's oid). add_source and drop_source on the
-- coordinator run it on every node; NULL user_column unregisters.
CREATE FUNCTION nudge._source_here(source text, user_column text, event_column text,
                                   time_column text, props_column text, event_name text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF user_column IS NULL THEN
        DELETE FROM nudge.sources s WHERE s.source = _source_here.source::regclass;
        RETURN;
    END IF;
    INSERT INTO nudge.sources AS s (source, user_column, event_column, time_column, props_column, event_name)
    VALUES (_source_here.source::regclass, _source_here.user_column, _source_here.event_column,
            _source_here.time_column, _source_here.props_column, _source_here.event_name)
    ON CONFLICT ON CONSTRAINT sources_pkey DO UPDATE
       SET user_column = EXCLUDED.user_column, event_column = EXCLUDED.event_column,
           time_column = EXCLUDED.time_column, props_column = EXCLUDED.props_column,
           event_name = EXCLUDED.event_name;
END
$$;

-- Registers the sources of one's own in the nudge.sources of every other
-- node (whose regclass is each node's oid of the table), as this node has
-- them; with `one_source`, that table alone, unregistered where it is no source
-- here any more. add_source, drop_source and distribute() run it.
CREATE FUNCTION nudge._sources_to_nodes(one_source regclass DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- not on this node (a coordinator given shards): its own row is the
    -- caller's, and a second connection would wait for it forever
    PERFORM nudge._on_nodes(ARRAY(
        SELECT CASE WHEN NOT n.here THEN c.commands END
          FROM nudge._nodes() n,
               (SELECT string_agg(format('SELECT nudge._source_here(%L, %L, %L, %L, %L, %L)',
                                         quote_ident(ns.nspname) || '.' || quote_ident(k.relname), s.user_column,
                                         s.event_column, s.time_column, s.props_column, s.event_name), '; ') AS commands
                  FROM pg_catalog.pg_class k
                  JOIN pg_catalog.pg_namespace ns ON ns.oid = k.relnamespace
                  LEFT JOIN nudge.sources s ON s.source = k.oid
                 WHERE k.oid = one_source
                    OR one_source IS NULL AND s.source IS NOT NULL AND s.source <> 'nudge.events'::regclass) c
         ORDER BY n.name, n.port));
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
            USING ERRCODE = '0A000', HINT = 'drop them first (docs/citus.md, "Not on a cluster yet")';
    END IF;
    IF nudge.capture_mode() = 'wal' THEN
        RAISE EXCEPTION 'distribute: WAL capture does not run on a cluster yet'
            USING ERRCODE = '0A000', HINT = 'SELECT nudge.set_capture(''immediate'') first (docs/citus.md)';
    END IF;
    -- a source of one's own is fine once it is distributed co-located with
    -- ours (a run after adding a node); before, it cannot be
    IF EXISTS (SELECT 1 FROM nudge.sources s WHERE s.source <> 'nudge.events'::regclass
                AND (NOT nudge._is_distributed('nudge.events') OR NOT nudge._colocated_source(s.source, s.user_column))) THEN
        RAISE EXCEPTION 'distribute: sources of your own (%) must be distributed after pg_nudge''s tables, co-located with them',
            (SELECT string_agg(source::text, ', ') FROM nudge.sources WHERE source <> 'nudge.events'::regclass)
            USING ERRCODE = '0A000',
                  HINT = 'nudge.drop_source them, distribute, then distribute each with colocate_with => ''nudge.events'' and nudge.add_source it again (docs/citus.md)';
    END IF;
    IF EXISTS (SELECT 1 FROM nudge.user_sql) THEN
        RAISE EXCEPTION 'distribute: SQL parts of definitions (audience_sql, context, the profile query) do not run on a cluster yet'
            USING ERRCODE = '0A000', HINT = 'docs/citus.md, "Not on a cluster yet"';
    END IF;
    -- the unsubscribe key, made once here: a node's pass reads its copy
    INSERT INTO nudge.secrets (name, value)
    VALUES ('unsubscribe', decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'))
    ON CONFLICT (name) DO NOTHING;
    FOREACH t IN ARRAY nudge._shared_tables() LOOP
        known := nudge._is_distributed(t::regclass);
        IF NOT known THEN
            EXECUTE 'SELECT pg_catalog.create_reference_table($1)' USING t::regclass;
            EXECUTE 'SELECT pg_catalog.truncate_local_data_after_distributing_table($1)' USING t::regclass;
        END IF;
        table_name := t; kind := 'reference'; RETURN NEXT;
    END LOOP;
    FOREACH t IN ARRAY nudge._per_user_tables() LOOP
        known := nudge._is_distributed(t::regclass);
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
    PERFORM nudge._on_nodes(array_fill('SELECT nudge._prepare_node()'::text, ARRAY[(SELECT count(*)::int FROM nudge._nodes())]));
    -- every node (a new one too) knows the sources of one's own
    PERFORM nudge._sources_to_nodes();
END
$$;

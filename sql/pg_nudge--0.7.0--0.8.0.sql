-- pg_nudge 0.7.0 -> 0.8.0: capture from the write-ahead log
-- (nudge.set_capture('wal'); docs/operations.md, "WAL capture").

-- a source added while in WAL capture: inserts that committed before this
-- position were not its events
ALTER TABLE nudge.sources ADD COLUMN wal_from pg_lsn;

-- WAL capture's state: one row while the database captures from its slot
CREATE TABLE nudge.wal_capture (
    one          boolean     PRIMARY KEY DEFAULT true CHECK (one),
    slot         name        NOT NULL,
    wal_from     pg_lsn      NOT NULL,
    until        pg_lsn,
    position     pg_lsn      NOT NULL,
    -- the last pass that took everything committed before it began
    caught_up_at timestamptz,
    since        timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('nudge.wal_capture', '');
REVOKE ALL ON nudge.wal_capture FROM PUBLIC;
GRANT SELECT ON nudge.wal_capture TO nudge_admin;

CREATE FUNCTION nudge."set_capture"(
	"mode" TEXT /* & str */
) RETURNS TEXT /* String */
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'set_capture_wrapper';
CREATE FUNCTION nudge."capture_mode"() RETURNS TEXT /* String */
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'capture_mode_wrapper';
REVOKE ALL ON FUNCTION nudge.set_capture(text), nudge.capture_mode() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge.set_capture(text), nudge.capture_mode() TO nudge_admin;

-- worker_status gains the capture mode and WAL capture's lag
DROP FUNCTION nudge.worker_status();
CREATE FUNCTION nudge."worker_status"() RETURNS TABLE (
	"running" bool,  /* bool */
	"last_pass" timestamp with time zone,  /* Option < TimestampWithTimeZone > */
	"passes" bigint,  /* i64 */
	"messages" bigint,  /* i64 */
	"errors" bigint,  /* i64 */
	"lag" interval,  /* Option < Interval > */
	"queued" bigint,  /* i64 */
	"failed" bigint,  /* i64 */
	"retried" bigint,  /* i64 */
	"capture" TEXT,  /* String */
	"wal_lag_bytes" bigint,  /* Option < i64 > */
	"wal_lag" interval  /* Option < Interval > */
)
STRICT
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'worker_status_wrapper';
REVOKE ALL ON FUNCTION nudge.worker_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION nudge.worker_status() TO nudge_admin, nudge_mailer;

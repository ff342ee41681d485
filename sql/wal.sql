-- WAL capture (nudge.set_capture('wal'); docs/operations.md, "WAL capture").
-- One row while the database captures from its logical replication slot, or
-- is still leaving that mode: the slot, where the statement triggers stopped
-- capturing (wal_from) or start again (until), and what has been enrolled.
-- `position` is written in the transaction that enrolls the events before
-- it, so a crash never loses them and never enrolls them twice; the slot is
-- moved up to it only afterwards.
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

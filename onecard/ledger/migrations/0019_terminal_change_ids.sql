-- Registering or moving one terminal made every server process re-read all
-- reference data (0017), terminals included: with a province's hundreds of
-- thousands of terminals that is a read of every one of them in each
-- process, and an event loop held long enough to delay every call in
-- flight, for each registration (python -m benchmarks.refdata_reread). The
-- notification now names the terminals a statement changed (up to 400 of
-- them, which keeps the payload far below NOTIFY's 8,000 bytes) and each
-- process re-reads only those. A statement that changed more says only
-- 'terminals', and the whole copy is re-read, as before (as it is when
-- many statements together name more than a re-read by id is worth:
-- refdata.TERMINALS_BY_ID_MAX). A transition table serves one event only,
-- so there is one trigger per event; TRUNCATE keeps 0017's function.
CREATE FUNCTION onecard_terminals_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(terminal_id) INTO ids
        FROM (SELECT terminal_id FROM changed_new LIMIT 401) s;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(terminal_id) INTO ids
        FROM (SELECT terminal_id FROM changed_old LIMIT 401) s;
    ELSE  -- an UPDATE may change the id itself: both the old and the new one
        SELECT array_agg(terminal_id) INTO ids
        FROM (SELECT terminal_id FROM changed_new
              UNION SELECT terminal_id FROM changed_old LIMIT 401) s;
    END IF;
    IF ids IS NULL THEN
        RETURN NULL;  -- no row changed
    ELSIF cardinality(ids) > 400 THEN
        PERFORM pg_notify('onecard_refdata', 'terminals');
    ELSE
        PERFORM pg_notify('onecard_refdata', 'terminals:' || array_to_string(ids, ','));
    END IF;
    RETURN NULL;
END $$;

DROP TRIGGER terminals_changed ON terminals;
CREATE TRIGGER terminals_inserted AFTER INSERT ON terminals
    REFERENCING NEW TABLE AS changed_new
    FOR EACH STATEMENT EXECUTE FUNCTION onecard_terminals_changed();
CREATE TRIGGER terminals_updated AFTER UPDATE ON terminals
    REFERENCING NEW TABLE AS changed_new OLD TABLE AS changed_old
    FOR EACH STATEMENT EXECUTE FUNCTION onecard_terminals_changed();
CREATE TRIGGER terminals_deleted AFTER DELETE ON terminals
    REFERENCING OLD TABLE AS changed_old
    FOR EACH STATEMENT EXECUTE FUNCTION onecard_terminals_changed();
CREATE TRIGGER terminals_truncated AFTER TRUNCATE ON terminals
    FOR EACH STATEMENT EXECUTE FUNCTION onecard_refdata_changed();

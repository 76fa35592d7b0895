-- The audit log says who did what to which card; a row changed or removed
-- afterwards would let a desk action disappear from it. Postings have been
-- append-only since 0001; the audit log now refuses UPDATE, DELETE and
-- TRUNCATE the same way (a superuser can still drop the trigger, and that
-- shows in the schema).
CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();

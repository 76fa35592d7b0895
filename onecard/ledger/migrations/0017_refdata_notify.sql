-- Each server process keeps reference data in memory (issuers, products,
-- operators, terminals, system account ids) and re-read it only for an id it
-- did not know, so a change to a known row went unseen until restart: a
-- terminal moved to another operator kept crediting the old operator's
-- payable. Every change to those tables now notifies channel onecard_refdata
-- at its COMMIT, and each process re-reads its copy (onecard/ledger/refdata_watch.py).
-- Statement-level: a bulk registration is one notification. On accounts only
-- what names an account: the desk's balance updates of system accounts do
-- not make every process re-read.
CREATE FUNCTION onecard_refdata_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('onecard_refdata', TG_TABLE_NAME);
    RETURN NULL;
END $$;

CREATE TRIGGER issuers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON issuers
    FOR EACH STATEMENT EXECUTE FUNCTION onecard_refdata_changed();
CREATE TRIGGER products_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON products
    FOR EACH STATEMENT EXECUTE FUNCTION onecard_refdata_changed();
CREATE TRIGGER operators_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON operators
    FOR EACH STATEMENT EXECUTE FUNCTION onecard_refdata_changed();
CREATE TRIGGER terminals_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON terminals
    FOR EACH STATEMENT EXECUTE FUNCTION onecard_refdata_changed();
CREATE TRIGGER accounts_changed AFTER INSERT OR DELETE OR UPDATE OF code OR TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION onecard_refdata_changed();

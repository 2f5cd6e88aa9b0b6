"""The data: every statement the worker runs (db.sql says how), grouped by the tables it serves,
the list of grants, and the Alembic migrations of the worker's own tables."""

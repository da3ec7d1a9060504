-- Runs once, as the superuser POSTGRES_USER, when the volume is first created.
-- Creating an extension needs a superuser; after this, `llens db upgrade`
-- (CREATE EXTENSION IF NOT EXISTS) works for the database owner.
CREATE EXTENSION IF NOT EXISTS vector;

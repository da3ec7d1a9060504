"""Alembic migrations of the latentlens schema (shipped as latentlens.migrations).

Revisions are numbered verb phrases (``0001_create_store``). SQL that users
call lives in ``sql/`` files named after the revision that introduced them;
a revision applies its files, so the functions are versioned with the schema.
"""

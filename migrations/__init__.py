"""Alembic migrations for difflabel's job store (applied by ``difflabel db upgrade``)."""

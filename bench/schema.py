"""The table the INSERT scenarios write to (shared by every variant's app)."""

from sqlalchemy import Column, Integer, MetaData, Table

metadata = MetaData()
rows = Table(
    "bench_rows",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("n", Integer),
)

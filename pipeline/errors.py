"""The error a bad value in an input table raises, before anyone knows which file holds it.

Transforms and checks see one concatenated table; only the prepare step knows which
Parquet file each row came from. A check raises :class:`TableError` with the row (and, when
it knows it, the table); :func:`in_table` fills the table in on the way out, and
:func:`prepare.tables.locate_error` turns the row into ``file, row of that file``. A
``TableError`` is a ``ValueError``, so callers that know no files (serving) treat it as
any other bad value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class TableError(ValueError):
    """A bad value in an input table.

    Args:
        message: what is wrong and what is accepted (no file: the locator adds it).
        table: "interactions", "users" or "items", when the raiser knows it.
        row: 0-based row in the concatenated table (files in sorted path order), if any.
    """

    def __init__(self, message: str, table: str | None = None, row: int | None = None):
        super().__init__(message)
        self.message, self.table, self.row = message, table, row

    def __str__(self) -> str:
        return self.message if self.row is None else f"row {self.row}: {self.message}"


@contextmanager
def in_table(table: str) -> Iterator[None]:
    """Name ``table`` on any :class:`TableError` raised inside that does not name one yet."""
    try:
        yield
    except TableError as err:
        if err.table is None:
            err.table = table
        raise

"""Stage tasks nested in another task (a sweep's configuration), committed as top-level tasks are.

Prefect opens a transaction for every task run, and a task run inside another task's run joins
that task's transaction: its cache record is written, and its SERIALIZABLE lock released, only when
the outer task commits. Prefect 3.9 never releases the lock of a cache hit whose outer task fails
(the rollback skips committed children), so the next run that wants it waits forever; and a failed
outer task throws away the records of the stages that had finished in it.

Each stage of a configuration is a step of its own, as in a single run: so within `own_transactions()`
no transaction is active, and the stage tasks called there open top-level transactions of their own.
This leans on Prefect's `BaseTransaction.__var__` (the context variable behind `get_transaction`);
a test checks that it still works so, and without it the stages keep Prefect's nesting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def own_transactions() -> Iterator[None]:
    """Within the block, task runs open transactions of their own instead of joining the active one."""
    from prefect.transactions import BaseTransaction, get_transaction

    variable = getattr(BaseTransaction, "__var__", None)
    if variable is None or get_transaction() is None:  # another Prefect release, or nothing to step out of
        yield
        return
    token = variable.set(None)
    try:
        yield
    finally:
        variable.reset(token)

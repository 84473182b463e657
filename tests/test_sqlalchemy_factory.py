"""register_factory: zope.sqlalchemy once per factory, a manager per session.

Real PostgreSQL, real ``transaction`` managers: every test reads back from a
second connection what really landed.
"""

import pytest
import transaction
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Table,
    create_engine,
    insert,
    text,
    update,
)
from sqlalchemy.orm import Session, registry, sessionmaker

from pyramid_tasks.sqlalchemy import (
    TM_KEY,
    NoTransactionManager,
    get_tm_session,
    mark_changed,
    register_factory,
)

metadata = MetaData()
items = Table("items", metadata, Column("id", Integer, primary_key=True))


class Item:
    def __init__(self, id):
        self.id = id


registry().map_imperatively(Item, items)


@pytest.fixture
def engine(database_url, pg_schema):
    engine = create_engine(database_url).execution_options(
        schema_translate_map={None: pg_schema}
    )
    with engine.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{pg_schema}"'))
        metadata.create_all(connection)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine):
    return register_factory(sessionmaker(bind=engine))


def landed(engine):
    with engine.connect() as connection:
        return sorted(connection.scalars(items.select()).all())


def new_tm():
    return transaction.TransactionManager(explicit=True)


def test_orm_writes_commit_and_abort_with_the_sessions_manager(factory, engine):
    tm = new_tm()
    with tm:
        get_tm_session(factory, tm).add(Item(1))  # after_attach joins
    tm.begin()
    get_tm_session(factory, tm).add(Item(2))
    tm.abort()
    assert landed(engine) == [1]


def test_two_sessions_two_managers_each_its_own_fate(factory, engine):
    """Interleaved, as two tasks on two threads would be."""
    first, second = new_tm(), new_tm()
    first.begin()
    second.begin()
    get_tm_session(factory, first).execute(text("SELECT 1"))  # after_begin joins
    get_tm_session(factory, second).add(Item(2))
    session = get_tm_session(factory, first)
    session.add(Item(1))
    session.flush()  # after_flush marks it changed
    second.abort()
    first.commit()
    assert landed(engine) == [1]


def test_core_writes_need_mark_changed_as_with_zope_sqlalchemy(factory, engine):
    tm = new_tm()
    with tm:
        get_tm_session(factory, tm).execute(insert(items).values(id=1))
    with tm:
        session = get_tm_session(factory, tm)
        session.execute(insert(items).values(id=2))
        mark_changed(session)
    assert landed(engine) == [2]


def test_mark_changed_before_any_statement_joins_the_sessions_manager(factory, engine):
    """zope.sqlalchemy's default would join the global ``transaction.manager``,
    which nobody commits: the row would not land."""
    tm = new_tm()
    with tm:
        session = get_tm_session(factory, tm)
        mark_changed(session)
        session.execute(insert(items).values(id=3))
    assert landed(engine) == [3]


def test_orm_dml_and_bulk_query_writes_are_seen(factory, engine):
    tm = new_tm()
    with tm:
        get_tm_session(factory, tm).add_all([Item(1), Item(2), Item(3)])
    with tm:  # do_orm_execute sees an ORM-enabled UPDATE
        session = get_tm_session(factory, tm)
        session.execute(update(Item).where(Item.id == 1).values(id=10))
    with tm:  # after_bulk_update
        get_tm_session(factory, tm).query(Item).filter(Item.id == 2).update({"id": 20})
    with tm:  # after_bulk_delete
        get_tm_session(factory, tm).query(Item).filter(Item.id == 3).delete()
    assert landed(engine) == [10, 20]


def test_session_commit_is_refused_as_with_zope_sqlalchemy(factory, engine):
    tm = new_tm()
    tm.begin()
    session = get_tm_session(factory, tm)
    session.add(Item(1))
    with pytest.raises(AssertionError, match="transaction manager"):
        session.commit()  # before_commit
    tm.abort()
    assert landed(engine) == []


def test_a_session_without_a_manager_is_refused_with_the_fix(factory):
    session = factory()
    with pytest.raises(NoTransactionManager, match=r"get_tm_session\(factory"):
        session.execute(text("SELECT 1"))
    session.close()
    with pytest.raises(NoTransactionManager, match=TM_KEY):
        mark_changed(factory())


def test_a_session_subclass_can_be_registered(engine):
    class AppSession(Session):
        pass

    register_factory(AppSession)
    tm = new_tm()
    with tm:
        AppSession(bind=engine, info={TM_KEY: tm}).add(Item(5))
        get_tm_session(sessionmaker(bind=engine, class_=AppSession), tm).add(Item(6))
    assert landed(engine) == [5, 6]


def test_registering_twice_attaches_nothing_more(factory, engine):
    """Twice-attached listeners would join twice and fail at commit."""
    assert register_factory(factory) is factory
    tm = new_tm()
    with tm:
        get_tm_session(factory, tm).add(Item(1))
    assert landed(engine) == [1]


@pytest.mark.parametrize("unregistered", [sessionmaker(), None])
def test_an_unregistered_factory_is_refused(unregistered):
    """Its sessions would join nothing: every write silently lost."""
    with pytest.raises(TypeError, match="register_factory"):
        get_tm_session(unregistered, new_tm())


def test_mark_changed_keeps_the_factorys_keep_session(engine):
    factory = register_factory(sessionmaker(bind=engine), keep_session=True)
    tm = new_tm()
    with tm:
        session = get_tm_session(factory, tm)
        mark_changed(session)  # joins here, before any statement
        item = Item(7)
        session.add(item)
    assert item in session  # kept (expired), not closed
    session.close()
    assert landed(engine) == [7]

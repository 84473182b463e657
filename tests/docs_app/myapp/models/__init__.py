"""The models of the docs' examples, and the cookiecutter's ``includeme`` as
``docs/transactions.rst`` writes it with ``pyramid_tasks.sqlalchemy``."""

from sqlalchemy import JSON, Column, Integer, Text, engine_from_config
from sqlalchemy.orm import sessionmaker

from pyramid_tasks.sqlalchemy import get_tm_session, register_factory

from .meta import Base

__all__ = ["Asset", "Base", "Incident", "Order", "Row", "Upload", "User"]


class Order(Base):
    __tablename__ = "orders"
    id = Column(Integer, primary_key=True)
    email = Column(Text)
    status = Column(Text, nullable=False, default="new")


class User(Base):
    __tablename__ = "users"
    id = Column(Integer, primary_key=True)
    email = Column(Text)
    points = Column(Integer, nullable=False, default=0)


class Upload(Base):
    __tablename__ = "uploads"
    id = Column(Integer, primary_key=True)
    filename = Column(Text)


class Row(Base):
    __tablename__ = "rows"
    id = Column(Integer, primary_key=True)
    upload_id = Column(Integer)
    data = Column(JSON)


class Asset(Base):
    __tablename__ = "assets"
    id = Column(Integer, primary_key=True)


class Incident(Base):
    __tablename__ = "incidents"
    id = Column(Integer, primary_key=True)
    job_id = Column(Text)
    task = Column(Text)
    error = Column(Text)


def includeme(config):
    config.include("pyramid_tm")
    config.include("pyramid_tasks")
    engine = engine_from_config(config.get_settings(), "sqlalchemy.")
    factory = register_factory(sessionmaker(bind=engine))
    config.registry["dbsession_factory"] = factory

    def dbsession(request):
        return get_tm_session(factory, request.tm, request=request)

    config.add_request_method(dbsession, reify=True)

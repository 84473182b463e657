from sqlalchemy import Column, DateTime, Float, Integer, Text, func

from .meta import Base


class Report(Base):
    """A report built by a slow task: ``pending``, ``running``, ``done``."""

    __tablename__ = "reports"

    id = Column(Integer, primary_key=True)
    state = Column(Text, nullable=False, default="pending")
    requested_at = Column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    started_at = Column(DateTime(timezone=True))
    finished_at = Column(DateTime(timezone=True))
    orders = Column(Integer)
    confirmed = Column(Integer)
    expired = Column(Integer)
    seconds = Column(Float)
    job_id = Column(Text)  # its build_report's job (and Celery task id)

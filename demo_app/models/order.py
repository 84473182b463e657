from sqlalchemy import Column, DateTime, Integer, Text, func

from .meta import Base


class Order(Base):
    """An order: ``new``, then ``confirmed`` by a task or ``expired`` by beat."""

    __tablename__ = "orders"

    id = Column(Integer, primary_key=True)
    email = Column(Text, nullable=False)
    status = Column(Text, nullable=False, default="new")
    created_at = Column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    confirmation_url = Column(Text)
    confirmed_at = Column(DateTime(timezone=True))
    # The Celery task id of its confirm_order: the id of its row in the job
    # table (pyramid_tasks.jobs), which the home page shows.
    job_id = Column(Text)

from sqlalchemy import Column, DateTime, Integer, Text

from .meta import Base


class Order(Base):
    __tablename__ = "orders"

    id = Column(Integer, primary_key=True)
    email = Column(Text, nullable=False)
    status = Column(Text, nullable=False, default="new")
    confirmation_url = Column(Text)
    confirmed_at = Column(DateTime(timezone=True))

from sqlalchemy import Boolean, Column, Integer, Text

from .meta import Base


class Order(Base):
    __tablename__ = "orders"
    id = Column(Integer, primary_key=True)
    email = Column(Text)
    receipt_url = Column(Text)
    packed = Column(Boolean, nullable=False, default=False)

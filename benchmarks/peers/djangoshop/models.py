"""The shop's two tables, as app.py declares them for SQLAlchemy."""
from __future__ import annotations

from django.db import models


class Author(models.Model):
    name = models.CharField(max_length=64)
    email = models.CharField(max_length=128)

    class Meta:
        db_table = "authors"


class Item(models.Model):
    name = models.CharField(max_length=64)
    category = models.CharField(max_length=16, db_index=True)
    price = models.IntegerField()  # cents
    tags = models.CharField(max_length=128)
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="items")

    class Meta:
        db_table = "items"

    @property
    def price_eur(self) -> float:
        return self.price / 100

    @property
    def tag_list(self) -> list[str]:
        return self.tags.split(",")

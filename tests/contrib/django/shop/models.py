from django.db import models


class Post(models.Model):
    title = models.CharField(max_length=200)
    body = models.TextField()
    published = models.DateField()

    class Meta:
        app_label = "shop"
        ordering = ["id"]

from django.urls import path

from tests.contrib.django.shop import views

urlpatterns = [path("items/<slug:slug>/", views.item)]

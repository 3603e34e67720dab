from django.urls import path

from djangoshop import views

urlpatterns = [
    path("items", views.items),
    path("error", views.error),
    path("outbound", views.outbound),
]

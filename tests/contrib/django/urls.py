from django.urls import include, path, re_path

from tests.contrib.django.shop import views

urlpatterns = [
    path("", views.home),
    path("posts/<int:pk>/", views.post_detail, name="post-detail"),
    re_path(r"^archive/(?P<year>[0-9]{4})/$", views.archive),
    path("api/", include("tests.contrib.django.shop.api_urls")),
    path("boom/", views.boom),
    path("stream/", views.stream),
    path("stream-fail/", views.stream_fail),
    path("download/", views.download),
    path("signup/", views.signup),
    path("anonymous/", views.anonymous),
    path("logged/", views.logged),
    path("renamed/", views.renamed),
    path("health/", views.health),
    path("reset/<str:token>/", views.reset),
    path("async/posts/<int:pk>/", views.async_posts),
    path("async/wait/", views.async_wait),
    path("async/boom/", views.async_boom),
    path("async/signup/", views.async_signup),
    path("async/reset/<str:token>/", views.async_reset),
    path("async/stream/", views.async_stream),
    path("async/stream-fail/", views.async_stream_fail),
    path("async/call/", views.async_call),
]

handler500 = "tests.contrib.django.shop.views.server_error"

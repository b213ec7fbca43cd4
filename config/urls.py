from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from billing import health
from billing.api.views import ObtainToken

urlpatterns = [
    path("admin/", admin.site.urls),
    # Account owners sign in here, not in the admin (which is for staff). Not
    # redirect_authenticated_user: a signed-in user with ?next=/accounts/login/ would be a 500.
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("billing/", include("billing.urls")),
    path("api/billing/", include("billing.api.urls")),
    # POST username and password, get the user's API token (the same one on every call).
    path("api/auth/token/", ObtainToken.as_view(), name="api-token"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("healthz", health.healthz, name="healthz"),
]

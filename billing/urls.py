from django.urls import path

from .webhook import views

app_name = "billing"

urlpatterns = [
    path("stripe/webhook/", views.stripe_webhook, name="stripe-webhook"),
]

from django.urls import path

from .api import pages
from .webhook import views

app_name = "billing"

urlpatterns = [
    path("", pages.my_billing, name="my-billing"),
    path("stripe/webhook/", views.stripe_webhook, name="stripe-webhook"),
]

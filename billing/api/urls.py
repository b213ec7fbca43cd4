from django.urls import path

from . import views

urlpatterns = [
    path("invoices/", views.InvoiceList.as_view(), name="billing-api-invoices"),
    path("subscription/", views.CurrentSubscription.as_view(), name="billing-api-subscription"),
]

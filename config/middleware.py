"""Request checks that hold for every URL of the project, so that no view has to repeat them."""

from django.core.exceptions import SuspiciousOperation

# Posted bodies whose fields Django parses into ``request.POST`` (a JSON webhook body is not read here).
FORM_CONTENT_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


class NulByteInRequest(SuspiciousOperation):
    """A NUL byte in a request's path, query string or form fields."""


class RejectNulBytesMiddleware:
    """Answer 400 to a request whose path, query string or form fields hold a NUL byte (0x00).

    PostgreSQL's text cannot hold NUL: one typed into an admin filter or search box
    (``/admin/billing/invoice/?status__exact=%00``) reached the database, and the page answered
    500. No URL or form of this project has a use for it, so it is refused before any view runs,
    the way Django refuses other suspicious input: ``SuspiciousOperation`` is answered 400 and
    logged on ``django.security.NulByteInRequest``.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if (
            "\x00" in request.path_info
            or _holds_nul(request.GET)
            or (request.method == "POST" and request.content_type in FORM_CONTENT_TYPES and _holds_nul(request.POST))
        ):
            raise NulByteInRequest("a NUL byte in the request's path, query string or form")
        return self.get_response(request)


def _holds_nul(query) -> bool:
    return any("\x00" in key or any("\x00" in value for value in values) for key, values in query.lists())

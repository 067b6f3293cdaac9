"""Who is calling the API: a bearer token (scripts) or a browser session (with CSRF).

* ``Authorization: Bearer <token>``: the token is looked up by its SHA-256; only the hash
  is stored, so a leaked database does not leak usable tokens. A script cannot be lured
  into sending a header by another site, so token requests need no CSRF token.
* A logged-in session: a browser sends its cookie to any site's form, so unsafe methods
  must carry Django's CSRF token (``X-CSRFToken`` header), exactly as the dashboard does.
* Neither: 401 (``not_authenticated``).

``BearerAuth`` and ``SessionAuth`` are the two ninja auth classes, tried in that order.
"""

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.middleware.csrf import CsrfViewMiddleware, get_token
from django.utils import timezone
from ninja.security import APIKeyCookie, HttpBearer

from workflows import operations
from workflows.api.errors import ApiError
from workflows.models import ApiToken

VIEW_PERMISSION = "workflows.view_run"
OPERATE_PERMISSION = operations.OPERATE_PERMISSION

TOKEN_PREFIX = "keel_"
# Characters of the token kept in clear (``keel_`` + 7): enough to tell tokens apart.
VISIBLE_CHARS = 12
# last_used_at is written at most this often per token, so busy scripts do not turn
# every read into a write.
LAST_USED_PRECISION = timedelta(seconds=60)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
HOW_TO_AUTHENTICATE = (
    'Send "Authorization: Bearer <token>" (create one with: manage.py create_api_token '
    "USERNAME --name WHAT-FOR), or log in to the dashboard and call the API from the browser."
)


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def create_token(user, name: str, *, expires_at=None) -> tuple[ApiToken, str]:
    """Create a token for ``user`` (refused after ``expires_at``, if given); returns the
    row and the token, which is never stored."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        user=user,
        name=name,
        prefix=raw[:VISIBLE_CHARS],
        token_hash=hash_token(raw),
        expires_at=expires_at,
    )
    return token, raw


class TokenExpired(Exception):
    """A token that was live until its ``expires_at``."""

    def __init__(self, token: ApiToken):
        super().__init__(token.expires_at)
        self.token = token


def revoke_token(token: ApiToken) -> bool:
    """Revoke a token; False when it was already revoked."""
    return bool(
        ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
    )


def token_for(raw: str) -> ApiToken | None:
    """The live token ``raw`` stands for (its user active), or None; TokenExpired for one
    past its ``expires_at``."""
    if not raw.startswith(TOKEN_PREFIX) or len(raw) > 200:
        return None
    token = (
        ApiToken.objects.select_related("user")
        .filter(token_hash=hash_token(raw), revoked_at__isnull=True)
        .first()
    )
    if token is None or not token.user.is_active:
        return None
    now = timezone.now()
    if token.expires_at is not None and token.expires_at <= now:
        raise TokenExpired(token)
    ApiToken.objects.filter(pk=token.pk).filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_PRECISION)
    ).update(last_used_at=now)
    return token


def require(user, *permissions: str) -> None:
    """403 unless ``user`` has at least one of ``permissions``."""
    if not any(user.has_perm(permission) for permission in permissions):
        wanted = "' or '".join(permissions)
        raise ApiError(
            403,
            f"{user.get_username()} lacks the '{wanted}' permission; ask an administrator "
            "to grant it.",
        )


class BearerAuth(HttpBearer):
    """``Authorization: Bearer <token>``. A request that sends the header is judged by it
    alone: a wrong token is a 401 even if the browser also has a session."""

    def __call__(self, request):
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise unauthenticated(
                f"The Authorization header must be 'Bearer <token>'. {HOW_TO_AUTHENTICATE}"
            )
        return self.authenticate(request, credentials.strip())

    def authenticate(self, request, token: str):
        try:
            found = token_for(token)
        except TokenExpired as expired:
            moment = expired.token.expires_at.isoformat(timespec="seconds")
            raise unauthenticated(
                f"This API token ('{expired.token.name}') expired at {moment}. Create a new "
                "one with: manage.py create_api_token USERNAME --name WHAT-FOR [--expires-in DAYS]."
            ) from None
        if found is None:
            raise unauthenticated(
                "This API token is unknown, revoked, or belongs to an inactive user. "
                "Create a new one with: manage.py create_api_token USERNAME --name WHAT-FOR."
            )
        request.user = found.user
        request.api_token = found
        return found.user


class SessionAuth(APIKeyCookie):
    """A dashboard login. Unlike ninja's SessionAuth it asks who is calling before it checks
    CSRF (no session is a 401, not a 403), answers CSRF failures in Keel's error shape, and
    gives a reading browser the CSRF cookie it needs for its next POST."""

    param_name = settings.SESSION_COOKIE_NAME

    def _get_key(self, request):
        return request.COOKIES.get(self.param_name)

    def authenticate(self, request, key):
        if not request.user.is_authenticated:
            return None
        request.api_token = None
        if request.method in SAFE_METHODS:
            get_token(request)
            return request.user
        reason = _csrf_failure(request)
        if reason:
            raise ApiError(
                403,
                f"CSRF check failed ({reason}). A browser session must send the csrftoken "
                "cookie's value in an X-CSRFToken header; scripts should use a bearer token "
                "instead.",
                code="csrf_failed",
            )
        return request.user


def not_authenticated() -> ApiError:
    return unauthenticated(f"Authentication required. {HOW_TO_AUTHENTICATE}")


class _CsrfCheck(CsrfViewMiddleware):
    def _reject(self, request, reason):
        return reason


def _csrf_failure(request) -> str | None:
    """Django's own CSRF verdict for this request: None when it passes, else the reason."""
    check = _CsrfCheck(lambda request: None)
    check.process_request(request)
    return check.process_view(request, None, (), {})


def unauthenticated(message: str) -> ApiError:
    return ApiError(401, message, headers={"WWW-Authenticate": 'Bearer realm="keel"'})

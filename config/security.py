"""The Content-Security-Policy header on every answer.

Keel's pages load their script and styles from /static/ only (htmx, keel.css) and run no
inline script, so the policy allows scripts from this origin alone. Inline ``style``
attributes stay allowed (``style-src-attr``): bars and the timeline are sized by them.
Django 5.2 has no CSP of its own; this is the whole of what Keel needs.
"""

from django.conf import settings


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response
        self.policy = settings.KEEL_CONTENT_SECURITY_POLICY

    def __call__(self, request):
        response = self.get_response(request)
        if self.policy:
            response.headers.setdefault("Content-Security-Policy", self.policy)
        return response

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from workflows.api import auth


class Command(BaseCommand):
    help = (
        "Create an API token for a user and print it once: only its SHA-256 is stored, so it "
        "cannot be shown again. Scripts send it as 'Authorization: Bearer <token>'."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "username", help="The user the token acts as (their permissions apply)."
        )
        parser.add_argument(
            "--name",
            required=True,
            help="What the token is for, e.g. 'nightly cron on etl-01' (shown in the admin).",
        )
        parser.add_argument(
            "--expires-in",
            type=int,
            metavar="DAYS",
            help="Refuse the token after this many days (default: it never expires).",
        )

    def handle(self, *args, **options):
        user = self._get_user(options["username"])
        name = options["name"].strip()
        if not name:
            raise CommandError("--name must not be empty; say what the token is for.")
        if len(name) > 100:
            raise CommandError("--name must be at most 100 characters.")
        days = options["expires_in"]
        if days is not None and not 1 <= days <= 3650:
            raise CommandError("--expires-in must be a number of days from 1 to 3650.")
        expires_at = timezone.now() + timedelta(days=days) if days else None
        token, raw = auth.create_token(user, name, expires_at=expires_at)
        until = f" until {expires_at.isoformat(timespec='seconds')}" if expires_at else ""
        self.stderr.write(
            f"Token {token.prefix}… '{token.name}' for {user.get_username()} created{until}. "
            "It is printed below once and cannot be shown again; revoke it in the admin "
            "(API tokens)."
        )
        self.stdout.write(raw)

    def _get_user(self, username):
        User = get_user_model()
        try:
            user = User.objects.get(**{User.USERNAME_FIELD: username})
        except User.DoesNotExist:
            raise CommandError(
                f"No user {username!r}. Create one with manage.py createsuperuser, or in the admin."
            ) from None
        if not user.is_active:
            raise CommandError(f"User {username!r} is inactive; a token for it would not work.")
        return user

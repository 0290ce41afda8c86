"""``manage.py token``: create, list and revoke worker tokens, API keys and admin keys."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.exceptions import ValidationError
from django.db import IntegrityError

from dispatch import conf
from dispatch.auth import create_credential
from dispatch.control.client import BrokerClient, ControlError, default_base_url
from dispatch.management.base import table
from dispatch.models import Credential
from workers.protocol import label


class Command(BaseCommand):
    help = ("Manage credentials. 'create' prints the new token once (only a digest is "
            "stored); 'revoke' closes the connections made with it within seconds. While "
            "no credential exists, the broker accepts local connections only.")

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        create = actions.add_parser("create", help="create a credential and print its token")
        create.add_argument("kind", choices=[k.value for k in Credential.Kind],
                            help="worker token, requester API key, or admin key (control API)")
        create.add_argument("name", help="a unique name, e.g. gpu-fleet or billing-service")
        create.add_argument("--commands", default="",
                            help="comma-separated commands: those a requester key may send, "
                                 "or a worker token may register (default: all)")
        create.add_argument("--max-connections", type=int, default=0,
                            help="connections per broker process at most (default 0: no limit)")
        create.add_argument("--max-priority", type=int, default=9, choices=range(10),
                            metavar="0-9",
                            help="the highest priority a requester key's requests get; more "
                                 "is served at this (default 9: any)")
        create.add_argument("--pool", action="append", default=[], metavar="POOL",
                            dest="pools",
                            help="tenancy: a worker token's workers serve only keys of this "
                                 "pool (repeat for several); a requester key is served only "
                                 "by workers of this pool (one). Without: a worker serves "
                                 "keys without a pool, and a key reaches every worker")
        create.add_argument("--label", action="append", default=[], type=label,
                            metavar="NAME=VALUE", dest="labels",
                            help="worker tokens: a label its workers carry whatever they say "
                                 "(repeatable)")
        create.add_argument("--version", default="", dest="worker_version",
                            help="worker tokens: the version its workers carry (canaries)")
        create.add_argument("--max-weight", type=float, default=None,
                            help="worker tokens: the highest weight its workers get")
        create.add_argument("--yes", action="store_true",
                            help="do not ask before the first credential ends protected mode "
                                 "(asked only when standard input is a terminal)")
        actions.add_parser("list", help="list credentials (never their tokens)")
        revoke = actions.add_parser("revoke", help="revoke a credential by name")
        revoke.add_argument("name", help="the credential's name")
        delete = actions.add_parser(
            "delete", help="delete a revoked credential; deleting the last one returns the "
                           "broker to protected mode, which needs --reopen-protected-mode")
        delete.add_argument("name", help="the credential's name (revoke it first)")
        delete.add_argument("--reopen-protected-mode", action="store_true",
                            help="allow deleting the last credential: local peers then need "
                                 "no token, remote ones are refused")

    def handle(self, *args: Any, **options: Any) -> None:
        getattr(self, f"handle_{options['action']}")(**options)

    def handle_create(self, kind: str, name: str, commands: str, max_connections: int,
                      max_priority: int, pools: list[str], labels: list[tuple[str, str]],
                      worker_version: str, max_weight: float | None, yes: bool,
                      **_: Any) -> None:
        allowed = [c.strip() for c in commands.split(",") if c.strip()]
        if allowed and kind == "admin":
            raise CommandError("--commands applies to requester keys and worker tokens")
        if max_priority < 9 and kind != "requester":
            raise CommandError("--max-priority applies to requester keys")
        if pools and kind == "admin":
            raise CommandError("--pool applies to requester keys and worker tokens")
        if not Credential.objects.exists() and not conf.get("API_TOKEN"):
            self.stderr.write(ending_protected_mode())
            if sys.stdin.isatty() and not yes and input(
                    "Create it, and end protected mode? [y/N] ").strip().lower() not in (
                    "y", "yes"):
                raise CommandError("Not created: the broker stays in protected mode")
        try:
            _, token = create_credential(
                name, kind, allowed, max_connections, max_priority, pools=pools,
                labels=dict(labels), version=worker_version, max_weight=max_weight)
        except IntegrityError:
            raise CommandError(f"A credential named '{name}' exists already") from None
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stderr.write(f"Created {kind} credential '{name}'. Its token is shown once:")
        self.stdout.write(token)
        if kind == "requester" and not pools and Credential.objects.exclude(pools=[]).exists():
            self.stderr.write("Note: this key has no --pool, so it reaches every worker, "
                              "those of every pool too.")

    def handle_list(self, **_: Any) -> None:
        rows = [(c.name, c.kind, "active" if c.active else "revoked", c.key_id,
                 ", ".join(c.pools) or "-", limits(c)) for c in Credential.objects.all()]
        self.stdout.write(table(("NAME", "KIND", "STATE", "KEY ID", "POOLS", "LIMITS"), rows)
                          if rows
                          else "No credentials: the broker is in protected mode (loopback "
                               "peers only).")

    def handle_revoke(self, name: str, **_: Any) -> None:
        if not Credential.objects.filter(name=name).update(active=False):
            raise CommandError(f"No credential named '{name}'")
        self.stdout.write(f"Revoked '{name}': its connections close within seconds.")

    def handle_delete(self, name: str, reopen_protected_mode: bool, **_: Any) -> None:
        credential = Credential.objects.filter(name=name).first()
        if credential is None:
            raise CommandError(f"No credential named '{name}'")
        if credential.active:
            raise CommandError(f"'{name}' is active: revoke it first (token revoke {name})")
        if Credential.objects.count() == 1 and not reopen_protected_mode:
            raise CommandError(f"'{name}' is the last credential: deleting it returns the "
                               "broker to protected mode (local peers need no token). Add "
                               "--reopen-protected-mode if that is what you want")
        credential.delete()
        left = Credential.objects.count()
        self.stdout.write(f"Deleted '{name}'." + ("" if left else
                          " No credential is left: the broker is in protected mode again."))


def limits(c: Credential) -> str:
    """What a credential may do, in a few words (``-``: anything of its kind)."""
    return ", ".join(filter(None, [
        f"commands: {', '.join(c.commands)}" if c.commands else "",
        f"max {c.max_connections} connections" if c.max_connections else "",
        f"priority <= {c.max_priority}" if c.max_priority < 9 else "",
        ", ".join(f"{k}={v}" for k, v in sorted(c.labels.items())),
        f"version {c.version}" if c.version else "",
        f"weight <= {c.max_weight:g}" if c.max_weight else ""])) or "-"


def ending_protected_mode() -> str:
    """What creating the first credential does to the fleet connected now, and how to
    keep it: said before it happens."""
    url = default_base_url()
    try:
        workers = BrokerClient(url, timeout=3).workers()
        online = f"The broker at {url} has {len(workers)} worker(s) connected now"
    except ControlError:
        online = f"No broker answered at {url} (BROKER_URL); a running one has its"
    return (f"This is the first credential: it ends protected mode for good. {online}: "
            "every connection made without a token (workers, requesters, dashboards) is "
            f"closed within {conf.get('AUTH_REFRESH_SECONDS'):g} s and refused from then "
            "on. Create every token now, one after the other, then start them again with "
            "theirs: `python manage.py token create worker NAME`, then "
            "`python -m workers HOST 8765 --token T` (or BROKER_TOKEN=T); "
            "`token create requester NAME` for requesters (`--token T`, or "
            "`Requester(url, token=T)`); `token create admin NAME` for the control API "
            "and /metrics.")


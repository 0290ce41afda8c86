"""``manage.py prune_history``: delete old request history and worker registrations."""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from dispatch import conf
from dispatch.history import PRUNE_BATCH, delete_batch, old_rows


def age(text: str) -> float:
    """argparse type for ``--older-than``: a duration of more than nothing."""
    try:
        seconds = conf.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be more than 0 (that would delete everything)")
    return seconds


class Command(BaseCommand):
    help = ("Delete the request history answered, and the registrations of worker "
            "connections that ended, more than --older-than ago (online workers stay). "
            "Rows go in batches, each a short transaction, so the broker keeps writing "
            "history meanwhile. With HISTORY_RETENTION set, the broker does this by itself "
            "about once an hour.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than", type=age, metavar="DURATION",
            help="how old a row must be to go: a number and a unit, s m h d w "
                 "(30d, 12h, 2w; default: the HISTORY_RETENTION setting)")
        parser.add_argument("--dry-run", action="store_true",
                            help="only say how many rows would go; delete nothing")
        parser.add_argument("--batch", type=int, default=PRUNE_BATCH, metavar="ROWS",
                            help=f"rows per DELETE statement (default {PRUNE_BATCH:,})")

    def handle(self, *args: Any, older_than: float | None, dry_run: bool, batch: int,
               **options: Any) -> None:
        seconds = older_than or conf.get("HISTORY_RETENTION")
        if not seconds:
            raise CommandError("Say how old: --older-than 30d (HISTORY_RETENTION is 0, "
                               "history is kept forever)")
        if batch < 1:
            raise CommandError("--batch must be at least 1")
        cut = timezone.now() - timedelta(seconds=seconds)
        when = f"{timezone.localtime(cut):%Y-%m-%d %H:%M:%S %Z}"
        for what, rows in old_rows(cut).items():
            total = rows.count()
            if dry_run or not total:
                self.stdout.write(f"{what}: {total:,} older than {when}"
                                  f"{' would be deleted' if dry_run and total else ''}")
                continue
            done = 0
            while deleted := delete_batch(rows, batch):
                done += deleted
                if options["verbosity"] > 0:
                    self.stdout.write(f"{what}: {done:,} of {total:,} deleted ...")
            self.stdout.write(self.style.SUCCESS(f"{what}: {done:,} older than {when} "
                                                 f"deleted"))

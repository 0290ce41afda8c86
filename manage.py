#!/usr/bin/env python
"""Django's command-line utility for the broker."""
import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "brokersite.settings")
    from django.core.management import execute_from_command_line

    from dispatch.conf import BadSetting

    try:
        execute_from_command_line(sys.argv)
    except BadSetting as exc:  # a setting, not a bug: no traceback
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()

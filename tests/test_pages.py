"""Pages for people: the landing page says what this is and where to go."""

from __future__ import annotations

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db


def test_the_landing_page_says_how_to_connect_and_links_everything(settings) -> None:
    settings.ALLOWED_HOSTS = ["broker.example"]
    response = Client(HTTP_HOST="broker.example:8000").get("/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "ws://broker.example:8765" in page and "ws://broker.example:8766" in page
    assert "python -m workers broker.example 8765" in page
    for link in ('href="/dashboard/"', 'href="/admin/"', 'href="/metrics"', 'href="/readyz"'):
        assert link in page
    assert "favicon.svg" in page


def test_the_landing_page_shows_nothing_of_the_fleet_and_takes_no_posts() -> None:
    client = Client(HTTP_HOST="localhost")
    assert client.head("/").status_code == 200
    assert client.post("/").status_code == 405
    assert "worker_id" not in client.get("/").content.decode()


def test_with_credentials_the_landing_page_shows_the_commands_with_their_token() -> None:
    from dispatch.auth import create_credential

    client = Client(HTTP_HOST="localhost")
    assert "Protected mode" in client.get("/").content.decode()
    create_credential("fleet", "worker")
    page = client.get("/").content.decode()
    assert "python -m workers localhost 8765 --token WORKER_TOKEN" in page
    assert "8766 --token API_KEY get_time" in page and "Protected mode" not in page


def test_the_admin_and_the_dashboard_have_the_icon_and_a_way_home(admin_client) -> None:
    assert "dispatch/favicon.svg" in admin_client.get("/admin/").content.decode()
    page = admin_client.get("/dashboard/").content.decode()
    assert 'href="/"' in page and "dispatch/favicon.svg" in page

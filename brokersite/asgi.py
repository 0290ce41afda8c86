"""The broker's one ASGI application: HTTP (admin, health, control API), both sockets,
and the lifespan of servers that send it."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "brokersite.settings")
django_asgi_app = get_asgi_application()  # sets Django up before consumers are imported

from channels.routing import ProtocolTypeRouter  # noqa: E402

from dispatch.tasks import signals as task_signals  # noqa: E402
from dispatch.transport.routing import (  # noqa: E402
    HttpPorts, Lifespan, SocketRouter, StaticFiles)

task_signals.install()  # this process's Django tasks send task_started / task_finished

application = ProtocolTypeRouter({
    "http": HttpPorts(StaticFiles(django_asgi_app)),
    "websocket": SocketRouter(),
    "lifespan": Lifespan(),  # uvicorn: schedules fire from it too (runbroker starts them)
})

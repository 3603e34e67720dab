"""kombu: `Producer.publish` is a `messaging` exit span (`RabbitMQ SEND to <exchange or
queue>` over AMQP; the subtype names the transport) with the trace headers in a copy of the
message's headers. A Celery task's publish is Celery's span already (contrib/celery.py): it
gets no second one. Consumers continue the trace with `beatlib.transaction(headers=...)`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from beatlib.context import get_active
from beatlib.guard import report
from beatlib.instrumentation import messaging
from beatlib.instrumentation.registry import Instrumentation
from beatlib.tracing import call_in

_HEADERS = 9  # the position of `headers` in Producer.publish(body, routing_key, ...)
# kombu's transport driver -> the span subtype, as Elastic names messaging systems
_SUBTYPES = {"amqp": "rabbitmq", "sqs": "sqs", "kafka": "kafka",
             "azureservicebus": "azureservicebus"}


class Kombu(Instrumentation):
    name = "kombu"
    module = "kombu.messaging"
    distribution = "kombu"
    versions = ">= 5.0, < 6"
    library = "kombu"
    tested = "5.7.0, RabbitMQ 3.10.8"
    wraps = "`Producer.publish` (and so `SimpleQueue.put`)"

    def patch(self, module: ModuleType) -> None:
        self.wrap(module, "Producer.publish", self._publish)

    def _publish(self, wrapped: Any, producer: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
        if get_active() is None:
            return wrapped(*args, **kwargs)
        given = args[_HEADERS] if len(args) > _HEADERS else kwargs.get("headers")
        if messaging.recorded(given):
            return wrapped(*args, **kwargs)
        routing_key = args[1] if len(args) > 1 else kwargs.get("routing_key")
        exchange = kwargs.get("exchange") or getattr(producer, "exchange", None)
        span = messaging.start_send(_subtype(producer), exchange, routing_key)
        try:
            headers = messaging.with_trace_headers(given)
            if headers is not None:
                if len(args) > _HEADERS:
                    args = (*args[:_HEADERS], headers, *args[_HEADERS + 1:])
                else:
                    kwargs = {**kwargs, "headers": headers}
        except Exception:  # odd headers: sent as they are, untraced
            report("kombu: adding trace headers")
        return call_in(span, wrapped, args, kwargs)


def _subtype(producer: Any) -> str:
    try:
        driver = producer.connection.transport.driver_type
    except Exception:  # no connection yet, or a transport without the attribute
        return "kombu"
    return _SUBTYPES.get(driver, driver if isinstance(driver, str) and driver else "kombu")


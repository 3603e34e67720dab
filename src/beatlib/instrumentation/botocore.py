"""botocore (and so boto3): one exit span per AWS API call (`BaseClient._make_api_call`, which
every client method and paginator page goes through), named and typed as Elastic's AWS spans:
S3 `storage`/`s3`, SQS `messaging`/`sqs`, SNS Publish `messaging`/`sns`, DynamoDB `db`/`dynamodb`,
any other call `aws`/<service>. SQS sends carry `traceparent`/`tracestate` message attributes.

The span is a leaf, so the urllib3 request underneath records no span of its own. Only names
are recorded (bucket, queue, topic, table, a Query's key condition, which holds placeholders
and not values): never a message body, an item, an attribute value or a phone number.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from beatlib.context import get_active
from beatlib.guard import report
from beatlib.instrumentation.http_spans import DEFAULT_PORTS
from beatlib.instrumentation.registry import Instrumentation
from beatlib.tracing import Span, outgoing_headers, start_span

logger = logging.getLogger("beatlib.instrumentation")

SQS_MAX_ATTRIBUTES = 10  # per message; SQS refuses a message with more
# operation: (action, the words of the name before the queue)
SQS_OPERATIONS = {
    "SendMessage": ("send", "SEND to"),
    "SendMessageBatch": ("send_batch", "SEND_BATCH to"),
    "ReceiveMessage": ("receive", "RECEIVE from"),
    "DeleteMessage": ("delete", "DELETE from"),
    "DeleteMessageBatch": ("delete_batch", "DELETE_BATCH from"),
}
_PARAMS = 1  # position of `api_params` in _make_api_call(operation_name, api_params)


class Botocore(Instrumentation):
    name = "botocore"
    module = "botocore.client"
    distribution = "botocore"
    versions = ">= 1.20, < 2"
    library = "botocore, and so boto3"
    tested = "1.44.8, with boto3 1.44.8"
    wraps = (
        "`BaseClient._make_api_call`, which every client method, resource action and"
        " paginator page calls"
    )

    def patch(self, module: ModuleType) -> None:
        self.wrap(module, "BaseClient._make_api_call", _make_api_call)


def _make_api_call(wrapped: Any, client: Any, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
    if get_active() is None:
        return wrapped(*args, **kwargs)
    operation = args[0] if args else kwargs.get("operation_name")
    positional = len(args) > _PARAMS
    params = args[_PARAMS] if positional else kwargs.get("api_params")
    span = _start(client, operation, params)
    if operation in ("SendMessage", "SendMessageBatch"):
        traced = _with_trace_attributes(client, operation, params)
        if traced is not params:
            if positional:
                args = (*args[:_PARAMS], traced, *args[_PARAMS + 1:])
            else:
                kwargs = {**kwargs, "api_params": traced}
    try:
        result = wrapped(*args, **kwargs)
    except BaseException as exc:
        _end(span, getattr(exc, "response", None), exc)  # ClientError: the parsed answer
        raise
    _end(span, result)
    return result


def _service(client: Any) -> str:
    return str(client.meta.service_model.service_id)


def _start(client: Any, operation: Any, params: Any) -> Span | None:
    """Open the span for `operation`, or None when nothing is recorded. Never raises."""
    active = get_active()
    if active is None or active.leaf or not active.transaction.sampled:
        return None
    try:
        meta = client.meta
        service = _service(client)
        operation = str(operation)
        params = params if isinstance(params, Mapping) else {}
        region = meta.region_name
        context: dict[str, Any] = {"destination": _destination(meta.endpoint_url, region)}
        name, span_type, subtype, action = _describe(service, operation, params, region,
                                                     context)
    except Exception:
        report("botocore: starting an API call span")
        return None
    span = start_span(name, span_type, subtype, action, leaf=True)
    if span is not None:
        span.context = context
    return span


def _destination(endpoint_url: Any, region: Any) -> dict[str, Any]:
    destination: dict[str, Any] = dict(_endpoint(str(endpoint_url or "")))
    if region:
        destination["cloud"] = {"region": str(region)}
    return destination


@functools.lru_cache(maxsize=64)  # a process talks to few endpoints; parsing is most of a span
def _endpoint(url: str) -> tuple[tuple[str, Any], ...]:
    """(("address", host), ("port", port)) of an endpoint URL, as far as it has them."""
    parts = urlsplit(url)
    if not parts.hostname:
        return ()
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        port = None
    return (("address", parts.hostname), ("port", port)) if port else (("address", parts.hostname),)


def _describe(service: str, operation: str, params: Mapping[str, Any], region: Any,
              context: dict[str, Any]) -> tuple[str, str, str, str]:
    """(name, type, subtype, action) of the span; adds the service's fields to `context`."""
    if service == "S3":
        bucket = _bucket(params.get("Bucket"))
        if bucket:
            context["service"] = {"target": {"type": "s3", "name": bucket}}
            context["destination"]["service"] = {"resource": bucket}
        return f"S3 {operation} {bucket}".rstrip(), "storage", "s3", operation
    if service == "DynamoDB":
        table = _table(params)
        context["db"] = db = {"type": "dynamodb"}
        if region:
            db["instance"] = str(region)
        condition = params.get("KeyConditionExpression")
        if operation == "Query" and isinstance(condition, str):
            db["statement"] = condition  # placeholders (`:name`); values are apart from it
        return f"DynamoDB {operation} {table}".rstrip(), "db", "dynamodb", "query"
    if service == "SQS" and operation in SQS_OPERATIONS:
        action, words = SQS_OPERATIONS[operation]
        queue = str(params.get("QueueUrl") or "").rstrip("/").rsplit("/", 1)[-1]
        if queue:
            context["message"] = {"queue": {"name": queue}}
        return f"SQS {words} {queue}".rstrip(), "messaging", "sqs", action
    if service == "SNS" and operation == "Publish":
        topic = _topic(params)
        if topic and topic != "[PHONENUMBER]":
            context["message"] = {"queue": {"name": topic}}
        return f"SNS PUBLISH to {topic}".rstrip(), "messaging", "sns", "publish"
    return f"{service} {operation}", "aws", service.lower().replace(" ", "-"), operation


def _bucket(bucket: Any) -> str:
    """The bucket name, or of an access point ARN the `accesspoint/name` part."""
    bucket = str(bucket or "")
    if bucket.startswith("arn:"):
        parts = bucket.split(":", 5)
        return parts[5] if len(parts) == 6 else bucket
    return bucket


def _table(params: Mapping[str, Any]) -> str:
    table = params.get("TableName")
    if isinstance(table, str) and table:
        return table.rsplit("table/", 1)[-1] if table.startswith("arn:") else table
    for key in ("TableArn", "SourceTableArn"):
        arn = params.get(key)
        if isinstance(arn, str) and "table/" in arn:
            return arn.split("table/", 1)[1].split("/", 1)[0]
    return ""  # batch and PartiQL calls: more than one table


def _topic(params: Mapping[str, Any]) -> str:
    if isinstance(params.get("TopicArn"), str):
        return params["TopicArn"].rsplit(":", 1)[-1]
    if isinstance(params.get("TargetArn"), str):  # a platform endpoint: its app, not the device
        return params["TargetArn"].rsplit(":", 1)[-1].rsplit("/", 1)[0]
    if params.get("PhoneNumber"):
        return "[PHONENUMBER]"  # personal data: never the number
    return ""


def _end(span: Span | None, response: Any, exc: BaseException | None = None) -> None:
    if span is None:
        return
    try:
        status = response["ResponseMetadata"]["HTTPStatusCode"]
        if isinstance(status, int) and span.context is not None:
            span.context["http"] = {"response": {"status_code": status}}
            if status >= 400:
                span.outcome = "failure"
    except Exception:  # no answer (a connection error) or an odd one: no status
        pass
    span.end(exc)


def _with_trace_attributes(client: Any, operation: str, params: Any) -> Any:
    """A copy of `params` whose messages carry the trace context as message attributes, or
    `params` itself when nothing is added. The caller's dicts are never changed."""
    try:
        if _service(client) != "SQS" or not isinstance(params, Mapping):
            return params
        headers = outgoing_headers()
        if not headers:
            return params
        attributes = {key: {"DataType": "String", "StringValue": value}
                      for key, value in headers.items()}
        if operation == "SendMessage":
            return _traced(params, attributes) or params
        entries = params.get("Entries")
        if not isinstance(entries, list):
            return params
        traced = [_traced(entry, attributes) or entry for entry in entries]
        return {**params, "Entries": traced}
    except Exception:
        report("botocore: adding trace context to SQS messages")
        return params


def _traced(message: Any, attributes: dict[str, Any]) -> dict[str, Any] | None:
    """`message` with the trace attributes added, or None when it keeps its own traceparent
    or has no room for ours (as many as there is room for, traceparent first, then
    tracestate, then baggage)."""
    if not isinstance(message, Mapping):
        return None
    own = message.get("MessageAttributes") or {}
    if not isinstance(own, Mapping) or any(str(k).lower() == "traceparent" for k in own):
        return None
    room = SQS_MAX_ATTRIBUTES - len(own)
    if room < len(attributes):
        if room < 1:
            logger.debug("beatlib: SQS message has %d attributes; no trace context added",
                         len(own))
            return None
        logger.debug("beatlib: SQS message has %d attributes; %s left out", len(own),
                     " and ".join(list(attributes)[room:]))
        attributes = dict(list(attributes.items())[:room])
    return {**message, "MessageAttributes": {**own, **attributes}}

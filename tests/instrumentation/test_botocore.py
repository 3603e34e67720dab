"""botocore/boto3: one exit span per API call against a real AWS-compatible HTTP server
(moto's server mode, a separate process on 127.0.0.1), and SQS trace context attributes."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator

import pytest
import wrapt

import beatlib
from beatlib.config import Config
from beatlib.tracing import parse_traceparent
from tests.instrumentation.http_server import free_port

pytest.importorskip("boto3")
if importlib.util.find_spec("moto") is None:
    pytest.skip("moto (its server mode) is not installed", allow_module_level=True)

import boto3  # noqa: E402
import botocore.client  # noqa: E402
import botocore.config  # noqa: E402
import botocore.exceptions  # noqa: E402

REGION = "eu-west-3"


@pytest.fixture(scope="module")
def aws() -> Iterator[str]:
    """The endpoint URL of a moto server process on 127.0.0.1 and a free port."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "MOTO_CALL_RESET_API": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start: {process.stderr.read()}") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def session(aws) -> Iterator[boto3.Session]:
    yield boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                        region_name=REGION)
    # Every test starts from empty buckets, queues, topics and tables.
    urllib.request.urlopen(urllib.request.Request(f"{aws}/moto-api/reset", method="POST"))


def client(session, aws, service: str):
    return session.client(service, endpoint_url=aws)


def check_exit(span: dict, aws: str, name: str, kind: str, subtype: str, action: str,
               status: int = 200) -> None:
    assert (span["name"], span["type"], span["subtype"], span["action"]) == (
        name, kind, subtype, action)
    port = int(aws.rsplit(":", 1)[1])
    destination = span["context"]["destination"]
    assert destination["address"] == "127.0.0.1" and destination["port"] == port
    assert destination["cloud"] == {"region": REGION}
    assert span["context"]["http"]["response"]["status_code"] == status
    assert span["outcome"] == ("success" if status < 400 else "failure")


def test_s3_spans_and_no_urllib3_span_under_them(traced, session, aws):
    s3 = client(session, aws, "s3")
    tx = traced.begin()
    s3.create_bucket(Bucket="my-bucket",
                     CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_object(Bucket="my-bucket", Key="a/b.txt", Body=b"secret body")
    assert s3.get_object(Bucket="my-bucket", Key="a/b.txt")["Body"].read() == b"secret body"
    traced.end()
    spans = traced.spans()
    # Three calls, three spans: the urllib3 request under each records nothing.
    assert [s["name"] for s in spans] == [
        "S3 CreateBucket my-bucket", "S3 PutObject my-bucket", "S3 GetObject my-bucket"]
    check_exit(spans[2], aws, "S3 GetObject my-bucket", "storage", "s3", "GetObject")
    for span in spans:
        assert span["parent_id"] == "%016x" % tx.id
        assert span["context"]["service"]["target"] == {"type": "s3", "name": "my-bucket"}
        assert span["context"]["destination"]["service"]["resource"] == "my-bucket"
    assert "secret body" not in repr(spans)


def test_client_error_is_failure_and_raised_unchanged(traced, session, aws):
    s3 = client(session, aws, "s3")
    s3.create_bucket(Bucket="my-bucket",
                     CreateBucketConfiguration={"LocationConstraint": REGION})
    traced.begin()
    with pytest.raises(botocore.exceptions.ClientError) as raised:
        s3.get_object(Bucket="my-bucket", Key="missing")
    traced.end()
    assert raised.value.response["Error"]["Code"] == "NoSuchKey"
    (span,) = traced.spans()
    check_exit(span, aws, "S3 GetObject my-bucket", "storage", "s3", "GetObject", 404)


def test_connection_error_is_failure(traced, session):
    s3 = session.client("s3", endpoint_url=f"http://127.0.0.1:{free_port()}",
                        config=botocore.config.Config(retries={"max_attempts": 1}))
    traced.begin()
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        s3.list_objects_v2(Bucket="b")
    traced.end()
    (span,) = traced.spans()
    assert span["name"] == "S3 ListObjectsV2 b" and span["outcome"] == "failure"
    assert "http" not in span["context"]


def test_sqs_send_carries_the_trace_and_receive_is_a_span(traced, session, aws):
    sqs = client(session, aws, "sqs")
    url = sqs.create_queue(QueueName="my-queue")["QueueUrl"]
    tx = traced.begin()
    params = {"QueueUrl": url, "MessageBody": "hello",
              "MessageAttributes": {"kind": {"DataType": "String", "StringValue": "greeting"}}}
    sqs.send_message(**params)
    received = sqs.receive_message(QueueUrl=url, MessageAttributeNames=["All"])
    traced.end()
    send, receive = traced.spans()
    check_exit(send, aws, "SQS SEND to my-queue", "messaging", "sqs", "send")
    check_exit(receive, aws, "SQS RECEIVE from my-queue", "messaging", "sqs", "receive")
    assert send["context"]["service"]["target"] == {"type": "sqs", "name": "my-queue"}
    assert send["context"]["destination"]["service"]["resource"] == "sqs/my-queue"
    assert send["context"]["message"]["queue"]["name"] == "my-queue"
    (message,) = received["Messages"]
    attributes = message["MessageAttributes"]
    assert attributes["kind"]["StringValue"] == "greeting"
    parent = parse_traceparent(attributes["traceparent"]["StringValue"])
    assert parent is not None
    assert (parent.trace_id, parent.span_id) == (tx.trace_id, send["id"])
    assert attributes["tracestate"]["StringValue"] == tx.tracestate
    assert list(params["MessageAttributes"]) == ["kind"]  # the caller's dict is untouched


def test_consumer_continues_the_trace(traced, session, aws):
    sqs = client(session, aws, "sqs")
    url = sqs.create_queue(QueueName="jobs")["QueueUrl"]
    producer = traced.begin()
    sqs.send_message(QueueUrl=url, MessageBody="work")
    traced.end("produce")
    (message,) = sqs.receive_message(QueueUrl=url, MessageAttributeNames=["traceparent",
                                                                          "tracestate"])["Messages"]
    headers = {name: value["StringValue"] for name, value in message["MessageAttributes"].items()}
    with beatlib.transaction("SQS RECEIVE from jobs", "messaging", traced.client,
                             headers=headers) as consumer:
        pass
    assert consumer.trace_id == producer.trace_id
    transactions, spans, _ = traced.shipped()
    (send,) = spans
    assert {t["id"]: t.get("parent_id") for t in transactions}["%016x" % consumer.id] == send["id"]


def _attributes(count: int) -> dict:
    return {f"a{i}": {"DataType": "String", "StringValue": str(i)} for i in range(count)}


def test_sqs_attribute_limit(traced, session, aws):
    sqs = client(session, aws, "sqs")
    url = sqs.create_queue(QueueName="full")["QueueUrl"]
    traced.begin()
    sqs.send_message(QueueUrl=url, MessageBody="ten", MessageAttributes=_attributes(10))
    sqs.send_message(QueueUrl=url, MessageBody="nine", MessageAttributes=_attributes(9))
    sqs.send_message(QueueUrl=url, MessageBody="eight", MessageAttributes=_attributes(8))
    traced.end()
    traced.client.begin_transaction("request", None, "userId=alice")
    sqs.send_message(QueueUrl=url, MessageBody="seven", MessageAttributes=_attributes(7))
    sqs.send_message(QueueUrl=url, MessageBody="eight more", MessageAttributes=_attributes(8))
    traced.end()
    got = {}
    for _ in range(10):
        for m in sqs.receive_message(QueueUrl=url, MessageAttributeNames=["All"],
                                     MaxNumberOfMessages=10).get("Messages", []):
            got[m["Body"]] = m["MessageAttributes"]
        if len(got) == 5:
            break
    assert len(got["ten"]) == 10 and "traceparent" not in got["ten"]
    assert len(got["nine"]) == 10 and "tracestate" not in got["nine"]
    assert "traceparent" in got["nine"]
    assert len(got["eight"]) == 10 and {"traceparent", "tracestate"} <= set(got["eight"])
    assert got["seven"]["baggage"]["StringValue"] == "userId=alice"
    assert {"traceparent", "tracestate"} <= set(got["seven"])
    assert len(got["eight more"]) == 10 and "baggage" not in got["eight more"]
    assert {"traceparent", "tracestate"} <= set(got["eight more"])


def test_sqs_batch_each_entry_and_own_traceparent_kept(traced, session, aws):
    sqs = client(session, aws, "sqs")
    url = sqs.create_queue(QueueName="batch")["QueueUrl"]
    theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    entries = [{"Id": "1", "MessageBody": "one"},
               {"Id": "2", "MessageBody": "two", "MessageAttributes": {
                   "traceparent": {"DataType": "String", "StringValue": theirs}}}]
    tx = traced.begin()
    sqs.send_message_batch(QueueUrl=url, Entries=entries)
    traced.end()
    (span,) = traced.spans()
    assert (span["name"], span["action"]) == ("SQS SEND_BATCH to batch", "send_batch")
    assert "MessageAttributes" not in entries[0]
    got = {}
    for _ in range(10):
        for m in sqs.receive_message(QueueUrl=url, MessageAttributeNames=["All"],
                                     MaxNumberOfMessages=10).get("Messages", []):
            got[m["Body"]] = m["MessageAttributes"]["traceparent"]["StringValue"]
        if len(got) == 2:
            break
    assert got["one"].split("-")[1:3] == [tx.trace_id, span["id"]]
    assert got["two"] == theirs


def test_sqs_outside_a_transaction_untouched(traced, session, aws):
    sqs = client(session, aws, "sqs")
    url = sqs.create_queue(QueueName="plain")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x")
    (message,) = sqs.receive_message(QueueUrl=url, MessageAttributeNames=["All"])["Messages"]
    assert "MessageAttributes" not in message
    assert traced.spans() == []


def test_sns_publish(traced, session, aws):
    sns = client(session, aws, "sns")
    arn = sns.create_topic(Name="topic")["TopicArn"]
    traced.begin()
    sns.publish(TopicArn=arn, Message="hi")
    sns.publish(PhoneNumber="+15555550123", Message="code qzxw-secret")
    traced.end()
    topic, phone = traced.spans()
    check_exit(topic, aws, "SNS PUBLISH to topic", "messaging", "sns", "publish")
    assert topic["context"]["service"]["target"] == {"type": "sns", "name": "topic"}
    assert topic["context"]["destination"]["service"]["resource"] == "sns/topic"
    assert phone["name"] == "SNS PUBLISH to [PHONENUMBER]"
    assert "5555550123" not in repr(phone) and "qzxw-secret" not in repr(phone)


def test_dynamodb(traced, session, aws):
    db = client(session, aws, "dynamodb")
    db.create_table(TableName="my-table", BillingMode="PAY_PER_REQUEST",
                    KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
                    AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}])
    traced.begin()
    db.put_item(TableName="my-table", Item={"pk": {"S": "secret-key"}})
    found = db.query(TableName="my-table", KeyConditionExpression="pk = :pk",
                     ExpressionAttributeValues={":pk": {"S": "secret-key"}})
    traced.end()
    assert found["Count"] == 1
    put, query = traced.spans()
    assert put["name"] == "DynamoDB PutItem my-table"
    check_exit(query, aws, "DynamoDB Query my-table", "db", "dynamodb", "query")
    assert query["context"]["db"] == {"type": "dynamodb", "instance": REGION,
                                      "statement": "pk = :pk"}
    assert query["context"]["service"]["target"] == {"type": "dynamodb", "name": REGION}
    assert "secret-key" not in repr([put, query])


def test_other_services(traced, session, aws):
    sts = client(session, aws, "sts")
    traced.begin()
    sts.get_caller_identity()
    traced.end()
    (span,) = traced.spans()
    check_exit(span, aws, "STS GetCallerIdentity", "aws", "sts", "GetCallerIdentity")
    assert span["context"]["service"]["target"] == {"type": "sts"}


def test_disabled_leaves_the_urllib3_span(traced, session, aws):
    make_api_call = botocore.client.BaseClient.__dict__["_make_api_call"]
    assert isinstance(make_api_call, wrapt.FunctionWrapper)
    beatlib.uninstrument()
    assert botocore.client.BaseClient.__dict__["_make_api_call"] is make_api_call.__wrapped__
    beatlib.instrument(Config(disabled_instrumentations="botocore", environ={}))
    assert botocore.client.BaseClient.__dict__["_make_api_call"] is make_api_call.__wrapped__
    traced.begin()
    client(session, aws, "sts").get_caller_identity()
    traced.end()
    (span,) = traced.spans()
    assert (span["type"], span["subtype"]) == ("external", "http")  # only urllib3's


def test_instrument_before_import(receiver, aws):
    script = textwrap.dedent("""
        import os, sys
        import beatlib
        client = beatlib.Client(service_name="before-import", server_url=os.environ[
            "RECEIVER_URL"], flush_interval="100ms", environ={})
        beatlib.instrument(client.config)
        assert "botocore" not in sys.modules
        import boto3
        s3 = boto3.client("s3", endpoint_url=os.environ["AWS_URL"], region_name="us-east-1",
                          aws_access_key_id="k", aws_secret_access_key="s")
        client.begin_transaction("script")
        s3.list_buckets()
        client.end_transaction("before import", "success")
        assert client.flush(10)
    """)
    env = {**os.environ, "RECEIVER_URL": receiver.url, "AWS_URL": aws}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (span,) = receiver.events("span")
    assert (span["name"], span["type"], span["subtype"]) == ("S3 ListBuckets", "storage", "s3")

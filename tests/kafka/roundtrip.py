#!/usr/bin/env python3
"""The seeds' produce.sh + consume.sh, as one bounded client run.

    ~/.cache/kpf/kafka-client/bin/python roundtrip.py --bootstrap 10.100.0.1:9092 --topic NAME [--count 10]

Bootstraps only through --bootstrap (the gateway's bootstrap port); everything after that goes
to the addresses the brokers advertise, as a cloud client's would. It:

1. creates the topic (3 partitions, replication factor 3) unless it exists (AdminClient), and
   waits until every partition has a leader;
2. produces --count messages "Test message N" with acks=all, message N to partition
   (N-1) % partitions so every partition leader (every broker, with the leaders spread) is
   written to, and checks every delivery report;
3. consumes the topic from the beginning with a fresh group id (subscribe, so the group
   coordinator is reached through its advertised port too) until every message arrived or
   --consume-timeout passes.

Prints one JSON summary line on stdout (librdkafka's own log goes to stderr) and exits 0 only
if the messages consumed are exactly the messages produced. Every step has a bounded timeout
and a watchdog ends the whole run after --deadline, so a wrong mapping makes it exit non-zero
instead of hanging.

Needs confluent-kafka: `cargo xtask setup` installs it into ~/.cache/kpf/kafka-client.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
import uuid

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

PARTITIONS = 3
REPLICATION = 3

START = time.monotonic()
SUMMARY = {"ok": False, "stage": "start"}
PRINTED = threading.Lock()


def elapsed():
    return round(time.monotonic() - START, 2)


def finish(code):
    """Prints the summary once and exits with `code` (without waiting for librdkafka threads)."""
    if PRINTED.acquire(blocking=False):
        SUMMARY["elapsed_s"] = elapsed()
        sys.stdout.write(json.dumps(SUMMARY, sort_keys=True) + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def fail(stage, why):
    SUMMARY["stage"] = stage
    SUMMARY["error"] = why
    finish(1)


def common(args):
    # Short socket and metadata timeouts: a connection that reaches the wrong broker, or none,
    # must turn into an error within the run's deadline.
    return {
        "bootstrap.servers": args.bootstrap,
        "socket.timeout.ms": 5000,
        "socket.connection.setup.timeout.ms": 5000,
        "metadata.max.age.ms": 10000,
        "topic.metadata.refresh.interval.ms": 2000,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 1000,
        "broker.address.family": "v4",
    }


def leaders(admin, topic):
    md = admin.list_topics(topic=topic, timeout=5)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        return None, ("no such topic" if t is None else str(t.error))
    return {p.id: p.leader for p in t.partitions.values()}, None


def create_topic(args):
    SUMMARY["stage"] = "create"
    admin = AdminClient(common(args))
    futures = admin.create_topics(
        [NewTopic(args.topic, num_partitions=PARTITIONS, replication_factor=REPLICATION)],
        operation_timeout=10,
        request_timeout=10,
    )
    try:
        futures[args.topic].result(timeout=15)
        SUMMARY["created"] = True
    except KafkaException as e:
        err = e.args[0]
        if err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
            fail("create", "create_topics: %s" % err)
        SUMMARY["created"] = False
    except Exception as e:  # the future's own timeout
        fail("create", "create_topics: %r" % e)

    deadline = time.monotonic() + 10
    last = None
    while True:
        try:
            parts, last = leaders(admin, args.topic)
        except KafkaException as e:
            parts, last = None, str(e)
        if parts is not None and len(parts) == PARTITIONS and all(l >= 0 for l in parts.values()):
            SUMMARY["leaders"] = {str(p): l for p, l in sorted(parts.items())}
            return sorted(parts)
        if time.monotonic() > deadline:
            SUMMARY["leaders"] = {str(p): l for p, l in sorted((parts or {}).items())}
            fail("create", "not every partition has a leader within 10 s (%s)" % last)
        time.sleep(0.2)


def produce(args, partitions):
    SUMMARY["stage"] = "produce"
    conf = common(args)
    conf.update({"acks": "all", "message.timeout.ms": 10000, "request.timeout.ms": 5000, "linger.ms": 0})
    producer = Producer(conf)
    reports = []

    def on_delivery(err, msg):
        reports.append((err, msg))

    sent = []
    for n in range(1, args.count + 1):
        value = "Test message %d" % n
        producer.produce(args.topic, value=value.encode(), partition=partitions[(n - 1) % len(partitions)],
                         on_delivery=on_delivery)
        sent.append(value)
        producer.poll(0)
    left = producer.flush(15)
    errors = ["%s (partition %d)" % (err, msg.partition()) for err, msg in reports if err is not None]
    delivered = [msg.value().decode() for err, msg in reports if err is None]
    SUMMARY["produced"] = len(delivered)
    if left or errors or len(reports) != args.count:
        SUMMARY["delivery_errors"] = errors
        fail("produce", "%d of %d delivered, %d still queued after 15 s" % (len(delivered), args.count, left))
    return sorted(sent)


def consume(args, expected):
    SUMMARY["stage"] = "consume"
    conf = common(args)
    conf.update({
        "group.id": "kpf-roundtrip-%s" % uuid.uuid4().hex[:12],
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 10000,
        "heartbeat.interval.ms": 1000,
    })
    consumer = Consumer(conf)
    consumer.subscribe([args.topic])
    got = []
    errors = []
    deadline = time.monotonic() + args.consume_timeout
    while len(got) < len(expected) and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None:
            continue
        if msg.error():
            if msg.error().code() != KafkaError._PARTITION_EOF:
                errors.append(str(msg.error()))
            continue
        got.append(msg.value().decode())
    SUMMARY["consumed"] = len(got)
    if errors:
        SUMMARY["consume_errors"] = errors[-5:]
    # close() leaves the group; bounded by the watchdog like everything else.
    consumer.close()
    return sorted(got)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--consume-timeout", type=float, default=20.0)
    ap.add_argument("--deadline", type=int, default=45, help="watchdog: exit 3 after this many seconds")
    args = ap.parse_args()
    SUMMARY.update({"bootstrap": args.bootstrap, "topic": args.topic})

    def watchdog(signum, frame):
        fail(SUMMARY.get("stage", "?"), "watchdog: no result within %d s" % args.deadline)

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(args.deadline)

    partitions = create_topic(args)
    sent = produce(args, partitions)
    got = consume(args, sent)
    SUMMARY["stage"] = "done"
    if got != sent:
        SUMMARY["missing"] = sorted(set(sent) - set(got))
        SUMMARY["unexpected"] = sorted(set(got) - set(sent)) + [m for m in set(got) if got.count(m) > 1]
        SUMMARY["error"] = "consumed %d messages, produced %d, and they differ" % (len(got), len(sent))
        finish(1)
    SUMMARY["ok"] = True
    finish(0)


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException as e:  # anything unexpected still ends with a summary and non-zero
        fail(SUMMARY.get("stage", "?"), "%s: %s" % (type(e).__name__, e))

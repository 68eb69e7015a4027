#!/usr/bin/env python3
"""Kafka producer and consumer throughput through one benchmark path, with a real client.

    ~/.cache/kpf/kafka-client/bin/python kafka_throughput.py --bootstrap 10.100.1.1:9093 --topic NAME --seconds 5

Bootstraps through --bootstrap only; every later connection goes where the brokers advertise
(the gateway's per-broker ports), as a cloud client's would. It:

1. creates the topic with one partition per broker and replication factor 1, so that every
   byte produced or consumed crosses the path under test once (replication would add
   broker-to-broker traffic that never touches the gateway), and checks that the partition
   leaders are distinct brokers;
2. produces --size-byte messages (random, incompressible) round-robin over the partitions for
   --seconds (or until each partition holds 90% of a log segment, see create_topic), acks=all,
   then flushes: produce throughput = bytes acknowledged / (first send to last acknowledgement);
3. consumes every message back from the beginning (assigned partitions, no group), failing at
   once on an offset gap: consume throughput = bytes read / (assign to last message);
4. deletes the topic.

Machine-wide busy CPU time (/proc/stat: user + system + irq + softirq + steal) is taken around
steps 2 and 3. Prints one JSON line on stdout and exits 0, or prints {"error": ...} and exits 1.
A watchdog ends the run after --deadline seconds.

Needs confluent-kafka 2.3 or later (`cargo xtask setup` installs the pinned one into
~/.cache/kpf/kafka-client).
"""

import argparse
import json
import os
import signal
import sys
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

RESULT = {"stage": "start"}
# The largest segment.bytes Kafka allows (an int32): 2 GiB - 1.
SEGMENT_BYTES = 2**31 - 1
# Set once the topic exists: a failed run still deletes it (it may hold a measurement's worth of data).
CLEANUP = []


def finish(code):
    sys.stdout.write(json.dumps(RESULT, sort_keys=True) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    # Without waiting for librdkafka's threads.
    os._exit(code)


def fail(why):
    RESULT["error"] = "%s: %s" % (RESULT["stage"], why)
    for undo in CLEANUP:
        try:
            undo()
        except Exception:
            pass
    finish(1)


def busy_cpu_s():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal: nice is left out, as the bench's cpu.rs does.
    busy = fields[0] + fields[2] + fields[5] + fields[6] + fields[7]
    return busy / os.sysconf("SC_CLK_TCK")


def common(args):
    return {
        "bootstrap.servers": args.bootstrap,
        "socket.timeout.ms": 5000,
        "socket.connection.setup.timeout.ms": 5000,
        "broker.address.family": "v4",
    }


def delete_topic(admin, topic, timeout):
    admin.delete_topics([topic], operation_timeout=timeout, request_timeout=timeout)[topic].result(timeout=timeout + 5)


def create_topic(args, admin, brokers):
    RESULT["stage"] = "create"
    # One log segment per partition for the whole measurement: crabka 0.3.8 skips the rest of a
    # segment when a fetch that did not fill its byte budget reads on into the next one (the
    # consumer then saw an offset gap, reached the end short of the count and waited for ever).
    # Its default segment is 1 GiB, about 65,000 of these messages per partition.
    topic = NewTopic(args.topic, num_partitions=brokers, replication_factor=1, config={"segment.bytes": str(SEGMENT_BYTES)})
    futures = admin.create_topics([topic], operation_timeout=10, request_timeout=10)
    try:
        futures[args.topic].result(timeout=15)
    except KafkaException as e:
        fail("create_topics: %s" % e.args[0])
    CLEANUP.append(lambda: delete_topic(admin, args.topic, 5))
    deadline = time.monotonic() + 10
    while True:
        t = admin.list_topics(topic=args.topic, timeout=5).topics.get(args.topic)
        if t is not None and t.error is None and len(t.partitions) == brokers:
            leaders = {p.id: p.leader for p in t.partitions.values()}
            if all(l >= 0 for l in leaders.values()):
                RESULT["leaders"] = {str(p): l for p, l in sorted(leaders.items())}
                if len(set(leaders.values())) != brokers:
                    fail("partition leaders %s are not %d distinct brokers" % (RESULT["leaders"], brokers))
                return sorted(leaders)
        if time.monotonic() > deadline:
            fail("not every partition has a leader within 10 s")
        time.sleep(0.1)


def produce(args, partitions):
    RESULT["stage"] = "produce"
    conf = common(args)
    conf.update({
        "acks": "all",
        "linger.ms": 5,
        "compression.type": "none",
        "message.timeout.ms": 30000,
        "queue.buffering.max.kbytes": 65536,
    })
    producer = Producer(conf)
    payload = os.urandom(args.size)
    acked = [0]
    errors = []

    def on_delivery(err, msg):
        if err is None:
            acked[0] += 1
        elif len(errors) < 5:
            errors.append(str(err))

    sent = 0
    # Stop early rather than roll a segment (see create_topic): 90% of one per partition, each
    # message counted with 64 bytes for its record and batch headers.
    cap = len(partitions) * (SEGMENT_BYTES * 9 // 10) // (args.size + 64)
    cpu0, t0 = busy_cpu_s(), time.monotonic()
    end = t0 + args.seconds
    while time.monotonic() < end and sent < cap:
        try:
            producer.produce(args.topic, payload, partition=partitions[sent % len(partitions)], on_delivery=on_delivery)
            sent += 1
            if sent % 64 == 0:
                producer.poll(0)
        except BufferError:
            # The local queue is full: wait for acknowledgements.
            producer.poll(0.005)
    left = producer.flush(30)
    t1, cpu1 = time.monotonic(), busy_cpu_s()
    if left or errors or acked[0] != sent:
        fail("%d of %d messages acknowledged, %d still queued after 30 s; errors: %s" % (acked[0], sent, left, errors))
    RESULT.update({"messages": sent, "capped": sent >= cap, "produce_bytes": sent * args.size, "produce_s": t1 - t0, "produce_cpu_s": cpu1 - cpu0})
    return sent


def consume(args, partitions, count):
    RESULT["stage"] = "consume"
    conf = common(args)
    conf.update({
        "group.id": "kpf-bench",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
        # Once the prefetch queue holds queued.max.messages.kbytes (64 MB for the whole consumer)
        # librdkafka stops fetching and looks again fetch.queue.backoff.ms later, 1 s by default:
        # a path that fills the queue faster than this loop drains it would leave the consumer
        # idle for most of each second and read slower than a slow path. 10 ms keeps the pause
        # short against the ~100 ms it takes to drain the queue.
        "fetch.queue.backoff.ms": 10,
    })
    consumer = Consumer(conf)
    got, got_bytes = 0, 0
    # Offsets of a plain topic (no compaction, no transactions) are contiguous from 0: a gap means
    # the broker skipped messages, and waiting for the count would never end.
    next_offset = {p: 0 for p in partitions}
    cpu0, t0 = busy_cpu_s(), time.monotonic()
    consumer.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING) for p in partitions])
    # Until every message is back; the watchdog ends a consumer that stalls (RESULT says how far it got).
    while got < count:
        # A batch call returns when it has num_messages or at the timeout: asking for more than
        # are left would idle the last call for the whole timeout, counted as consuming time.
        for msg in consumer.consume(num_messages=min(10000, count - got), timeout=1.0):
            err = msg.error()
            if err is not None:
                # Client-level events (a dropped connection) are retried by librdkafka; a fatal
                # error or one about the topic's partitions is not.
                if err.fatal() or msg.topic() is not None:
                    fail(str(err))
                continue
            p, off = msg.partition(), msg.offset()
            if off > next_offset[p]:
                fail("partition %d: offset %d where %d was expected: the broker skipped %d messages" % (p, off, next_offset[p], off - next_offset[p]))
            if off < next_offset[p]:
                fail("partition %d: offset %d again (expected %d)" % (p, off, next_offset[p]))
            next_offset[p] = off + 1
            got += 1
            got_bytes += len(msg.value())
        RESULT["consumed"] = got
    t1, cpu1 = time.monotonic(), busy_cpu_s()
    RESULT.update({"consumed": got, "consume_bytes": got_bytes, "consume_s": t1 - t0, "consume_cpu_s": cpu1 - cpu0})
    consumer.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--brokers", type=int, default=3, help="partitions: one per broker")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=1024, help="message size in bytes")
    ap.add_argument("--deadline", type=int, default=120, help="watchdog: give up after this many seconds")
    args = ap.parse_args()

    signal.signal(signal.SIGALRM, lambda *_: fail("watchdog: no result within %d s" % args.deadline))
    signal.alarm(args.deadline)

    try:
        admin = AdminClient(common(args))
        partitions = create_topic(args, admin, args.brokers)
        count = produce(args, partitions)
        consume(args, partitions, count)
        RESULT["stage"] = "delete"
        CLEANUP.clear()
        delete_topic(admin, args.topic, 10)
    except Exception as e:
        # Whatever went wrong (a timeout, a KafkaException): still one JSON line saying what.
        fail(repr(e))
    RESULT["stage"] = "done"
    finish(0)


if __name__ == "__main__":
    main()

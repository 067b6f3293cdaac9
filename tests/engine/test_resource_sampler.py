"""The heartbeat's resource sample: what it measures, in the worker's own process."""

import socket

from workflows.runtime.heartbeat import ResourceSampler


def test_network_traffic_between_two_samples_is_counted_in_bytes_per_second():
    sampler = ResourceSampler()
    sampler.sample(0.0)
    # Some traffic of our own on the loopback interface, which psutil counts too.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            peer, _ = server.accept()
            with peer:
                client.sendall(b"x" * 2_000_000)
                received = 0
                while received < 2_000_000:
                    received += len(peer.recv(1 << 20))

    sample = sampler.sample(0.0)

    # Both directions of the loopback count: at least the 2 MB sent, over well under 100 s.
    assert sample["network_bytes_per_second"] >= 2_000_000 / 100
    assert {"cpu_percent", "rss_bytes", "io_wait_percent"} <= set(sample)

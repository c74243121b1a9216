"""The replica-lag throttle does not overshoot its limit between two probes (it overshot to 38 MB against a 4 MB
limit, probing once per second): while the lag is within a factor of the limit it probes before every batch (a
cheap read of pg_stat_replication), and far below the limit the interval grows from short to ``every`` only as the
readings stay low, so a lag that starts to grow is seen within a few batches."""

from __future__ import annotations

from backfill.policies import LagReading, ReplicaLag, RunContext
from backfill.testing import FakeClock

MB = 1024 * 1024


class Replica:
    """A replica behind a primary: each batch adds WAL, and the replica replays it at a fixed rate."""

    def __init__(self, clock: FakeClock, replay_per_second: float) -> None:
        self.clock, self.replay_per_second = clock, replay_per_second
        self.lag = 0.0
        self.at = clock()
        self.probes = 0

    def catch_up(self) -> None:
        self.lag = max(0.0, self.lag - (self.clock() - self.at) * self.replay_per_second)
        self.at = self.clock()

    def probe(self) -> LagReading:
        self.probes += 1
        self.catch_up()
        return LagReading(1, int(self.lag))


def simulate(throttle: ReplicaLag, replica: Replica, clock: FakeClock, *, batches: int) -> list[float]:
    """Run ``batches`` batches of 50 ms that each write 1 MB of WAL; return the true lag as each batch starts."""
    ctx = RunContext("lag", 1_000, clock(), clock)
    lag_at_start: list[float] = []
    while len(lag_at_start) < batches:
        wait = throttle(ctx)
        if wait > 0:
            clock.advance(float(wait))
            continue
        replica.catch_up()
        lag_at_start.append(replica.lag)
        clock.advance(0.05)
        replica.catch_up()
        replica.lag += 1 * MB
        ctx.record_batch(1_000, 0.05)
    return lag_at_start


def test_lag_near_the_limit_is_probed_before_every_batch_so_it_never_overshoots() -> None:
    clock = FakeClock()
    replica = Replica(clock, replay_per_second=5 * MB)  # slower than the 20 MB/s the backfill writes
    throttle = ReplicaLag(replica.probe, max_bytes=4 * MB, every=1.0, poll=0.5)

    lag = simulate(throttle, replica, clock, batches=200)

    assert max(lag) <= 4 * MB + 1  # no batch starts while the replica is past the limit (+1: float crumbs)
    assert replica.probes < 2 * 200  # a probe per batch near the limit, no more


def test_far_below_the_limit_it_still_probes_once_per_interval() -> None:
    clock = FakeClock()
    replica = Replica(clock, replay_per_second=100 * MB)  # keeps up easily: the lag stays near 0
    throttle = ReplicaLag(replica.probe, max_bytes=64 * MB, every=1.0, poll=0.5)

    simulate(throttle, replica, clock, batches=200)  # 10 s of batches

    assert replica.probes <= 15  # 5 while the interval grows to 1 s, then one a second

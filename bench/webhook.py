"""Benchmark "webhook": ``customer.subscription.updated`` for many subscriptions.

Workload: S subscriptions (default 2,000), each created once during the warm-up (so the timed
runs measure the update path on rows that exist) and then updated U times per round, each
update with a later ``created`` and a new seat count (so that every one is applied, not
skipped as stale). Updates go out subscription by subscription, round-robin, so the same
subscription never has two events in flight: this measures throughput, not lock waits.
Round r continues the same subscriptions' history, with new event ids.

Goals (at 8 connections): the pipeline handles at least 70% of the minimal baseline's rate,
with p99 below 50 ms, and answers 2xx to every request.
"""

from __future__ import annotations

import time

from bench.core import RESULTS, Context, log
from bench.server import serve
from bench.targets import TARGETS, Batch, available_targets, compare, verdict
from billing.simulation.delivery import encode
from billing.simulation.objects import event_object, subscription_object

FULL = {"subscriptions": 2000, "updates": 3, "rounds": 3, "duration": 120.0}
QUICK = {"subscriptions": 150, "updates": 2, "rounds": 1, "duration": 15.0}
RATE_GOAL = 0.70


class Workload:
    """Subscription events with deterministic ids; ``tag`` keeps ids of separate uses apart."""

    def __init__(self, subscriptions: int, updates: int, tag: str = ""):
        self.subscriptions, self.updates, self.tag = subscriptions, updates, tag
        self.start = int(time.time()) - 7 * 86400  # created a week ago, in its first month

    def subscription(self, i: int, n: int) -> dict:
        """Subscription ``i`` after its ``n``-th change (0: as created): the seats cycle 1..5."""
        return subscription_object(
            id=f"sub_bench{self.tag}{i:06d}",
            customer=f"cus_bench{self.tag}{i:06d}",
            status="active",
            quantity=1 + n % 5,
            current_period_start=self.start,
            current_period_end=self.start + 30 * 86400,
            created=self.start,
        )

    def event(self, i: int, n: int) -> dict:
        after = self.subscription(i, n)
        previous = None
        if n:  # as Stripe does: the old value of every top-level field that changed
            before = self.subscription(i, n - 1)
            previous = {key: value for key, value in before.items() if after.get(key) != value}
        return event_object(
            type="customer.subscription.updated" if n else "customer.subscription.created",
            obj=after,
            created=self.start + 60 * n,
            id=f"evt_bench{self.tag}{i:06d}n{n:04d}",
            previous_attributes=previous,
        )

    def batch(self, changes) -> Batch:
        events = [self.event(i, n) for n in changes for i in range(self.subscriptions)]
        return Batch.of(events, [encode(e) for e in events])

    def setup(self) -> Batch:
        return self.batch([0])

    def round(self, r: int) -> Batch:
        return self.batch(range(1 + r * self.updates, 1 + (r + 1) * self.updates))


def options(ctx: Context) -> dict:
    opts = dict(QUICK if ctx.quick else FULL)
    for key in opts:
        if getattr(ctx.args, key, None) is not None:
            opts[key] = getattr(ctx.args, key)
    return opts


def run(ctx: Context) -> dict:
    if ctx.args.profile:
        from bench.profile import profile_webhook

        return profile_webhook(ctx)
    opts = options(ctx)
    workload = Workload(opts["subscriptions"], opts["updates"])
    log(f"webhook: {opts}, {ctx.args.connections} connections, gunicorn {ctx.gunicorn}")
    with serve(ctx.gunicorn, RESULTS / "gunicorn-webhook.log.tmp") as server:
        targets, missing = available_targets(ctx, server, TARGETS)
        result = compare(
            ctx,
            server,
            targets,
            warmup=workload.setup(),
            duration=opts["duration"],
            rounds=(workload.round(r) for r in range(opts["rounds"])),
        )
    return {"options": opts, "unavailable": missing, **result, **verdict(ctx, result, missing, rate_goal=RATE_GOAL)}

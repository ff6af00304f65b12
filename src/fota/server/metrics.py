"""Prometheus metrics of the control center, read from the database at each scrape.

Everything comes from the shared database, so one scrape of any API process shows the whole
fleet, however many control-center workers write to it. Counters are totals (take
``rate()`` in Prometheus for per-second figures): ``fota_statuses_received_total`` is the
ingestion rate (statuses stored, those the retention deleted since included, so it never goes
down), ``fota_statuses_dropped_total{reason}`` the statuses not stored (refused at parsing,
over a device's rate limit), ``fota_chunk_bytes_served_total`` the chunk bytes served,
``fota_commands_sent_again_total`` the command copies beyond each job's first (expired ones
signed again, fota.server.expiry; unanswered ones sent again, fota.server.unanswered).
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

from fota.server import counters
from fota.server.campaigns import states as S
from fota.server.deployments import UPDATE
from fota.server.store import Campaign, CampaignDevice, Device, Job, StatusEvent, Store

__all__ = ["CONTENT_TYPE_LATEST", "FleetCollector", "render"]


class FleetCollector:
    """A prometheus_client collector over a Store."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        with self.store.session() as s:
            online = GaugeMetricFamily("fota_devices", "Devices known to the control center, by online state",
                                       labels=["online"])
            counts = dict(s.execute(select(Device.online, func.count()).group_by(Device.online)).all())
            for flag in (True, False):
                online.add_metric(["true" if flag else "false"], counts.get(flag, 0))
            yield online

            # each device's latest update job: where every device is in its update
            latest = (select(func.max(Job.id).label("id")).where(Job.kind == UPDATE)
                      .group_by(Job.device_id).subquery())
            by_state = GaugeMetricFamily("fota_device_updates",
                                         "Devices by the state of their latest update job", labels=["state"])
            for state, n in s.execute(select(Job.state, func.count()).join(latest, Job.id == latest.c.id)
                                      .group_by(Job.state)):
                by_state.add_metric([state], n)
            yield by_state

            campaigns = {c.id: c for c in s.scalars(select(Campaign))}
            state = GaugeMetricFamily("fota_campaign_state", "1 for the campaign's current state",
                                      labels=["campaign", "state"])
            wave = GaugeMetricFamily("fota_campaign_wave", "Current wave (1-based)", labels=["campaign"])
            for c in campaigns.values():
                state.add_metric([c.name, c.state], 1)
                wave.add_metric([c.name], c.wave + 1)
            yield state
            yield wave
            devices = GaugeMetricFamily("fota_campaign_devices", "Devices of a campaign by state",
                                        labels=["campaign", "state"])
            totals: dict[int, int] = {}
            succeeded: dict[int, int] = {}
            for cid, st, n in s.execute(select(CampaignDevice.campaign_id, CampaignDevice.state, func.count())
                                        .group_by(CampaignDevice.campaign_id, CampaignDevice.state)):
                devices.add_metric([campaigns[cid].name, st], n)
                if st != S.SKIPPED:
                    totals[cid] = totals.get(cid, 0) + n
                if st == S.SUCCEEDED:
                    succeeded[cid] = n
            yield devices
            progress = GaugeMetricFamily("fota_campaign_progress",
                                         "Share of a campaign's targeted devices that succeeded (0..1)",
                                         labels=["campaign"])
            for cid, c in campaigns.items():
                total = totals.get(cid, 0)
                progress.add_metric([c.name], succeeded.get(cid, 0) / total if total else 0.0)
            yield progress

            ingest = counters.totals(s)
            statuses = CounterMetricFamily("fota_statuses_received",
                                           "Device statuses stored, pruned ones included (rate() of it: "
                                           "the ingestion rate)")
            stored = s.scalar(select(func.count()).select_from(StatusEvent)) or 0
            statuses.add_metric([], stored + ingest.get(counters.PRUNED, 0))
            yield statuses
            dropped = CounterMetricFamily("fota_statuses_dropped",
                                          "Device statuses acknowledged but not stored: refused at parsing "
                                          "(oversize, invalid) or over the device's rate limit (rate_limited)",
                                          labels=["reason"])
            for reason, name in (("oversize", counters.OVERSIZE), ("invalid", counters.INVALID),
                                 ("rate_limited", counters.RATE_LIMITED)):
                dropped.add_metric([reason], ingest.get(name, 0))
            yield dropped
            pruned = CounterMetricFamily("fota_statuses_pruned",
                                         "Statuses deleted by the status history retention policy")
            pruned.add_metric([], ingest.get(counters.PRUNED, 0))
            yield pruned
            served = CounterMetricFamily("fota_chunk_bytes_served", "Chunk payload bytes served to devices")
            served.add_metric([], s.scalar(select(func.coalesce(func.sum(Job.bytes_served), 0))) or 0)
            yield served
            # copies beyond each job's first: expired ones signed again, unanswered ones sent again
            again = CounterMetricFamily("fota_commands_sent_again",
                                        "Commands published again (expired before their device took them, "
                                        "or unanswered by their online device)")
            again.add_metric([], s.scalar(select(func.coalesce(func.sum(Job.sends - 1), 0)).where(Job.sends > 1)) or 0)
            yield again


def render(store: Store) -> bytes:
    """The exposition text of the fleet's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(store))
    return generate_latest(registry)

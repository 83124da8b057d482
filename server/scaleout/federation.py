"""A federated /metrics: every replica's Prometheus exposition merged into one, each sample labelled with
the replica it came from (`replica="..."`). Families are merged by name, so each is described once."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

REPLICA_LABEL = "replica"


def merge_expositions(texts: dict[str, str]) -> bytes:
    """Replica id -> its /metrics text, as one exposition in Prometheus' text format."""
    families: dict[str, Metric] = {}
    for replica_id, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            merged.samples.extend(Sample(s.name, {**s.labels, REPLICA_LABEL: replica_id}, s.value, s.timestamp,
                                         s.exemplar) for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed:
    """A collector that yields the merged families as they are."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self):
        return self._families

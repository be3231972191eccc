"""``breakfix_collector_parse_skipped_total{source}``: bad input the sources skipped and went on without.

The sources count what they skip themselves (``KmsgSource.skipped`` lines, ``DcgmRules.skipped``
samples, ``FabricRules.skipped_files``); this collector reads those counts when ``/metrics`` is
scraped, so detection code never imports reporting. The daemon registers one per registry and
``watch``es each source it builds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


class ParseSkipped(Collector):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.sources: dict[str, Callable[[], int]] = {}
        if registry is not None:
            registry.register(self)

    def watch(self, source: str, count: Callable[[], int]) -> None:
        self.sources[source] = count

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily("breakfix_collector_parse_skipped",
                                     "Lines, samples or files a source could not read and skipped", labels=["source"])
        for source, count in sorted(self.sources.items()):
            family.add_metric([source], float(count()))
        yield family

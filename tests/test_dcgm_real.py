"""The dcgm source against real dcgm-exporter pages and the exporter's own label and value conventions.

Inputs: ``tests/data/dcgm_real_pod_exporter_blanks.txt`` (a real two-GPU page, sources in ``tests/data/SOURCES.md``)
and pages written in the templates of NVIDIA/dcgm-exporter ``internal/pkg/rendermetrics/render_metrics.go``
(``gpuMetricsFormat``, ``linkMetricsFormat``) with field names from ``etc/default-counters.csv`` and DCGM 4.x
names from ``tests/data/dcgm_fields.csv``.
"""

from __future__ import annotations

from pathlib import Path

from breakfix.collectors.context import NodeContext
from breakfix.collectors.dcgm import DcgmRules
from breakfix.collectors.edge import Cycle
from breakfix.collectors.promtext import parse
from breakfix.schemas.catalog import Catalog
from tests.conftest import T0

DATA = Path(__file__).resolve().parent / "data"
POD_PAGE = (DATA / "dcgm_real_pod_exporter_blanks.txt").read_text()
UUID0, UUID1 = "GPU-c0b5694b-2b5d-6b20-f903-558341437f6b", "GPU-fbe0b676-9b79-be59-aad5-7e7560a23b26"
H100 = ('gpu="0",UUID="GPU-58e8f5ea-13cc-013a-d88f-2bcf5ae8bc77",pci_bus_id="00000000:1A:00.0",device="nvidia0",'
        'modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-074",DCGM_FI_DRIVER_VERSION="550.90.07"')
# DCGM dcgm_structs.h: DCGM_INT32_BLANK 0x7ffffff0, then NOT_FOUND, NOT_SUPPORTED, NOT_PERMISSIONED
INT32_BLANKS = ("2147483632", "2147483633", "2147483634", "2147483635")


def rules(catalog: Catalog) -> DcgmRules:
    return DcgmRules(NodeContext(cluster="c1", node="n1", catalog=catalog))


def faults(cycle: Cycle) -> set[tuple[str, str | None]]:
    return {(s.check, s.gpu.uuid if s.gpu else None) for s in cycle.states if not s.healthy}


def page(*rows: tuple[str, str, str, str]) -> str:
    """(field, type, labels, value) rows -> a page, one HELP/TYPE block per field as the exporter writes it."""
    out: list[str] = []
    for name, typ, labels, value in rows:
        if f"# TYPE {name} " not in "\n".join(out):
            out += [f"# HELP {name} {name}.", f"# TYPE {name} {typ}"]
        out.append(f"{name}{{{labels}}} {value}")
    return "\n".join(out) + "\n"


def test_real_pod_exporter_page_with_not_supported_blanks_is_healthy_and_names_both_gpus(catalog: Catalog) -> None:
    """A GeForce-class page: ECC, retired pages and NVLink read DCGM_INT64_NOT_SUPPORTED. None of it is a fault,
    nothing is a bad sample, and a later XID is an event on the right GPU."""
    r = rules(catalog)
    first = r.apply(POD_PAGE, T0, 0.0)
    second = r.apply(POD_PAGE, T0, 30.0)
    assert not faults(first) and not faults(second) and not first.events and r.skipped == 0
    assert {(s.check, s.gpu.uuid if s.gpu else None) for s in second.states} == {
        ("pcie.replay", UUID0), ("pcie.replay", UUID1), ("clock.hw_thermal", UUID0), ("clock.hw_thermal", UUID1)}
    xid = POD_PAGE.replace(f'DCGM_FI_DEV_XID_ERRORS{{gpu="1", UUID="{UUID1}",container="test1",namespace="default",'
                           'pod="gpu-rs-joo-m4z6t"} 0', f'DCGM_FI_DEV_XID_ERRORS{{gpu="1", UUID="{UUID1}",'
                           'container="test1",namespace="default",pod="gpu-rs-joo-m4z6t"} 43')
    assert xid != POD_PAGE
    assert [(e.code, e.gpu.uuid if e.gpu else None) for e in r.apply(xid, T0, 60.0).events] == [("43", UUID1)]


def test_int32_blank_codes_in_dcgm_counters_are_not_faults(catalog: Catalog) -> None:
    """DCGM returns its INT32 sentinels in INT64 fields too (dcgm-exporter ``utils.go`` ``isInt64Blank`` drops
    them); one written as a number was a volatile DBE of 2147483634 and a PCIe replay burst."""
    for blank in INT32_BLANKS:
        r = rules(catalog)
        r.apply(POD_PAGE, T0, 0.0)
        leaked = POD_PAGE.replace("9223372036854775794", blank).replace(
            f'DCGM_FI_DEV_PCIE_REPLAY_COUNTER{{gpu="0", UUID="{UUID0}",container="",namespace="",pod=""}} 0',
            f'DCGM_FI_DEV_PCIE_REPLAY_COUNTER{{gpu="0", UUID="{UUID0}",container="",namespace="",pod=""}} {blank}')
        leaked = leaked.replace(f'DCGM_FI_DEV_XID_ERRORS{{gpu="0", UUID="{UUID0}",container="",namespace="",pod=""}} 0',
                                f'DCGM_FI_DEV_XID_ERRORS{{gpu="0", UUID="{UUID0}",container="",namespace="",pod=""}} '
                                f'{blank}')
        cycle = r.apply(leaked, T0, 30.0)
        assert not faults(cycle) and not cycle.events, blank
        assert r.skipped == 0, "a blank is no value, not a bad sample"


def test_int32_blank_window_applies_to_dcgm_families_only() -> None:
    text = "# TYPE vllm:prompt_tokens counter\nvllm:prompt_tokens_total 2147483640\n"
    assert [s.value for s in parse(text)["vllm:prompt_tokens_total"]] == [2147483640.0]


def test_retired_pages_pending_and_near_the_limit_are_faults_under_both_field_names(catalog: Catalog) -> None:
    """default-counters.csv "Retired pages" (fields 390-392; DCGM 4.x DCGM_FI_DEV_PAGE_RETIRED_*) were not read:
    a V100 with a page pending retirement read healthy."""
    for pending, sbe, dbe in (("DCGM_FI_DEV_RETIRED_PENDING", "DCGM_FI_DEV_RETIRED_SBE", "DCGM_FI_DEV_RETIRED_DBE"),
                              ("DCGM_FI_DEV_PAGE_RETIRED_PENDING", "DCGM_FI_DEV_PAGE_RETIRED_SBE_TOTAL",
                               "DCGM_FI_DEV_PAGE_RETIRED_DBE_TOTAL")):
        two = H100.replace('gpu="0"', 'gpu="1"').replace("58e8f5ea", "6043e4b2").replace("1A:00", "40:00")
        text = page((pending, "counter", H100, "1"), (pending, "counter", two, "0"),
                    (sbe, "counter", H100, "2"), (sbe, "counter", two, "58"),
                    (dbe, "counter", H100, "1"), (dbe, "counter", two, "4"))
        cycle = rules(catalog).apply(text, T0, 0.0)
        assert faults(cycle) == {("retired_pages.pending", "GPU-58e8f5ea-13cc-013a-d88f-2bcf5ae8bc77"),
                                 ("retired_pages.limit", "GPU-6043e4b2-13cc-013a-d88f-2bcf5ae8bc77")}, pending
        assert len(cycle.states) == 4, "each GPU judged on both checks"
    assert catalog.classify(check="retired_pages.pending", code=None).category == "gpu_reset_required"


def test_nvlink_per_link_rows_count_as_their_gpus_sum_and_name_it_by_gpu_uuid(catalog: Catalog) -> None:
    """linkMetricsFormat rows (``nvlink``, ``gpu``, ``gpu_uuid``, ``model_name``, ``hostname``): only the first
    link's counter was read, under a GPU with no UUID."""
    def link_page(errors: list[int]) -> str:
        rows = [("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "counter",
                 f'nvlink="{i}",gpu="0",gpu_uuid="GPU-aa",pci_bus_id="00000000:1A:00.0",device="nvidia0",'
                 f'model_name="NVIDIA H100 80GB HBM3",hostname="n1"', str(n)) for i, n in enumerate(errors)]
        return page(*rows, ("DCGM_FI_DEV_XID_ERRORS", "gauge", 'gpu="0",UUID="GPU-aa",hostname="n1"', "0"))

    r = rules(catalog)
    r.apply(link_page([0] * 18), T0, 0.0)
    cycle = r.apply(link_page([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 30]), T0, 60.0)
    (nv,) = [s for s in cycle.states if s.check == "nvlink.errors"]
    assert (nv.healthy, nv.value, nv.gpu.uuid if nv.gpu else None) == (False, 30.0, "GPU-aa")
    assert {s.gpu.key() for s in cycle.states if s.gpu} == {"GPU-aa"}, "link rows join their GPU's own rows"

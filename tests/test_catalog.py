"""The fault catalog: NVIDIA's documented resolution per XID, and the cautious default."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from breakfix.schemas.catalog import CATALOG_DIR, Catalog, load_catalog
from breakfix.schemas.common import Severity
from breakfix.schemas.datafile import DataFileError
from breakfix.schemas.incident import Domain


class TestDocumentedXids:
    @pytest.mark.parametrize(
        ("xid", "bucket", "category", "domain"),
        [
            ("13", "RESTART_APP", "application_fault", Domain.TENANT),
            ("31", "RESTART_APP", "application_fault", Domain.TENANT),
            ("43", "IGNORE", "informational", Domain.TENANT),
            ("45", "WORKFLOW_XID_45", "sympathetic", Domain.NONE),
            ("48", "WORKFLOW_XID_48", "gpu_reset_required", Domain.OPERATOR),
            ("63", "IGNORE", "informational", Domain.NONE),
            ("64", "RESET_GPU", "gpu_reset_required", Domain.OPERATOR),
            ("74", "WORKFLOW_NVLINK_ERR", "nvlink_fault", Domain.OPERATOR),
            ("79", "RESTART_BM", "node_reboot_required", Domain.OPERATOR),
            ("92", "IGNORE", "informational", Domain.NONE),
            ("94", "RESTART_APP", "application_fault", Domain.TENANT),
            ("95", "RESET_GPU", "gpu_reset_required", Domain.OPERATOR),
            ("119", "RESET_GPU", "gpu_reset_required", Domain.OPERATOR),
            ("120", "RESET_GPU", "gpu_reset_required", Domain.OPERATOR),
            # CHECK_UVM: "If UVM/vGPU is being utilized, RESET_GPU": every CUDA process uses UVM (classes.yaml)
            ("159", "CHECK_UVM", "gpu_reset_required", Domain.OPERATOR),
        ],
        ids=lambda v: str(v),
    )
    def test_xid_follows_nvidia_immediate_bucket(self, catalog: Catalog, xid: str, bucket: str, category: str,
                                                 domain: Domain) -> None:
        fc = catalog.xid(xid)
        assert fc.known
        assert fc.bucket == bucket
        assert fc.category == category
        assert fc.domain == domain
        assert "docs.nvidia.com/deploy/xid-errors" in fc.source

    def test_xid_94_contained_error_is_app_restart_in_either_domain(self, catalog: Catalog) -> None:
        """NVIDIA says 'either' for 94: the category restarts the app; policy decides the domain."""
        assert catalog.xids[94].default_domain == "either"

    def test_every_entry_cites_a_source(self, catalog: Catalog) -> None:
        assert len(catalog.xids) >= 170
        assert all(e.source for e in catalog.xids.values())


class TestCautiousDefault:
    @pytest.mark.parametrize("code", ["173", "999", "abc", "", "165"],
                             ids=["next", "huge", "text", "empty", "no-bucket"])
    def test_unknown_or_unbucketed_xid_is_unknown_fault(self, catalog: Catalog, code: str) -> None:
        fc = catalog.xid(code)
        assert fc.category == "unknown_fault"
        assert fc.domain == Domain.OPERATOR
        assert not fc.known

    def test_unknown_check_is_unknown_fault(self, catalog: Catalog) -> None:
        assert catalog.classify(check="psu.smoke", code=None).category == "unknown_fault"

    def test_unknown_dcgm_code_is_unknown_fault(self, catalog: Catalog) -> None:
        assert catalog.dcgm_code("DCGM_FR_FROM_THE_FUTURE").category == "unknown_fault"


class TestXid154:
    @pytest.mark.parametrize(
        ("verdict", "category"),
        [("None", "informational"), ("Drain and Reset", "gpu_drain_reset_required"),
         ("GPU Reset Required", "gpu_reset_required"), ("Node Reboot Required", "node_reboot_required")],
    )
    def test_recovery_action_text_decides(self, catalog: Catalog, verdict: str, category: str) -> None:
        msg = f"GPU recovery action changed from 0x0 (None) to 0x4 ({verdict})"
        assert catalog.xid("154", msg).category == category

    def test_unreadable_recovery_action_is_cautious(self, catalog: Catalog) -> None:
        assert catalog.xid("154", "garbled").category == "unknown_fault"


class TestDcgm:
    @pytest.mark.parametrize(
        ("code", "category"),
        [("DCGM_FR_VOLATILE_DBE_DETECTED", "gpu_reset_required"), ("DCGM_FR_SXID_ERROR", "node_reboot_required"),
         ("DCGM_FR_VOLATILE_SBE_DETECTED", "informational"), ("DCGM_FR_RETIRED_PAGES_LIMIT", "hardware_support")],
    )
    def test_dcgm_failure_codes_follow_nvsentinel_mapping(self, catalog: Catalog, code: str, category: str) -> None:
        assert catalog.classify(check="dcgm.health", code=code).category == category

    def test_an_sram_threshold_from_nvml_or_dcgm_is_one_critical_hardware_support_fact(self, catalog: Catalog) -> None:
        """NVIDIA Xid catalog WORKFLOW_XID_48 (SRAM threshold flag set -> RUN_FIELDDIAG, RMA); DCGM reports the same
        flag as DCGM_FR_SRAM_THRESHOLD (dcgm_errors.c: DCGM_ERROR_ISOLATE): counted as the NVML check."""
        nvml = catalog.classify(check="ecc.sram_threshold", code=None)
        dcgm = catalog.classify(check="dcgm.health", code="DCGM_FR_SRAM_THRESHOLD")
        assert nvml.known and dcgm.known
        assert (nvml.category, nvml.severity, nvml.domain) == (dcgm.category, dcgm.severity, dcgm.domain) == (
            "hardware_support", Severity.CRITICAL, Domain.OPERATOR)
        assert dcgm.equivalent == "ecc.sram_threshold"
        sem = catalog.semantics.dcgm["DCGM_FR_SRAM_THRESHOLD"]
        assert (sem.severity, sem.can_perform_workload) == ("ISOLATE", False), "never capped to monitoring"


class TestEndpointChecks:
    def test_a_stuck_engine_is_classified_like_a_down_endpoint(self, catalog: Catalog) -> None:
        """The server answers but generates nothing: as unavailable to the tenant as endpoint.down (critical,
        endpoint_slo, tenant domain), never the operator's unknown_fault."""
        stuck = catalog.classify(check="endpoint.stuck", code=None)
        down = catalog.classify(check="endpoint.down", code=None)
        assert stuck.known and (stuck.category, stuck.severity, stuck.domain) == (
            down.category, down.severity, down.domain) == ("endpoint_slo", Severity.CRITICAL, Domain.TENANT)


def copy_catalog(dest: Path) -> None:
    """The shipped catalog files, copied so a test can break one of them."""
    for f in CATALOG_DIR.iterdir():
        if f.suffix in (".csv", ".yaml"):
            (dest / f.name).write_text(f.read_text())


class TestLoadFailsFast:
    def test_unknown_category_reference_names_file(self, tmp_path: Path) -> None:
        copy_catalog(tmp_path)
        text = (tmp_path / "classes.yaml").read_text().replace("IGNORE: informational", "IGNORE: nonsense")
        (tmp_path / "classes.yaml").write_text(text)
        with pytest.raises(DataFileError, match=r"classes.yaml.*unknown category 'nonsense'"):
            load_catalog(tmp_path)

    def test_bad_xid_row_names_line(self, tmp_path: Path) -> None:
        copy_catalog(tmp_path)
        lines = (tmp_path / "xid_catalog.csv").read_text().splitlines()
        lines[3] = "x" + lines[3]
        (tmp_path / "xid_catalog.csv").write_text("\n".join(lines) + "\n")
        with pytest.raises(DataFileError, match=r"xid_catalog.csv:4: bad XID row"):
            load_catalog(tmp_path)


class TestCatalogBuild:
    """``tools/build_catalog.py`` regenerates the CSVs from the reference extracts without losing breakfix's rows."""

    @staticmethod
    def _tool():  # type: ignore[no-untyped-def]
        import importlib.util

        path = Path(__file__).resolve().parent.parent / "tools" / "build_catalog.py"
        spec = importlib.util.spec_from_file_location("build_catalog", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    def test_a_rebuild_keeps_breakfixs_dcgm_rows_after_the_upstream_ones(self, tmp_path: Path) -> None:
        ref = tmp_path / "ref"
        ref.mkdir()
        (ref / "xid_catalog.csv").write_text("xid,source\n48,https://docs.nvidia.com/deploy/xid-errors/\n")
        (ref / "xid_catalog_detail.csv").write_text(
            "xid,mnemonic,description,immediate_action,investigatory_action,domain,applies_A100,applies_H100,"
            "applies_B100,applies_GB200\n48,ECC_DBE,DBE,RESET_GPU,NONE,operator,YES,YES,YES,YES\n")
        (ref / "dcgm_fr_to_action_nvsentinel.csv").write_text(
            "dcgm_fr_code,nvsentinel_recommended_action\nDCGM_FR_UNKNOWN,CONTACT_SUPPORT\n"
            "DCGM_FR_CONTAINED_ERROR,RESTART_APP\n")  # upstream took one of ours: upstream's row wins
        self._tool().main(ref, out=tmp_path)
        rows = list(csv.DictReader((tmp_path / "dcgm_fr_catalog.csv").open()))
        assert [(r["code"], r["nvsentinel_action"]) for r in rows] == [
            ("DCGM_FR_UNKNOWN", "CONTACT_SUPPORT"), ("DCGM_FR_CONTAINED_ERROR", "RESTART_APP"),
            ("DCGM_FR_UNCORRECTABLE_ROW_REMAP_LIMIT", "CONTACT_SUPPORT")]

    def test_the_shipped_dcgm_catalog_holds_every_addition(self) -> None:
        root = Path(__file__).resolve().parent.parent
        shipped = {r["code"]: r for r in csv.DictReader(
            (root / "breakfix" / "schemas" / "catalog" / "dcgm_fr_catalog.csv").open())}
        for add in csv.DictReader((root / "tools" / "dcgm_fr_additions.csv").open()):
            assert shipped[add["code"]] == add

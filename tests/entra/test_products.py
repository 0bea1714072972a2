"""The product-name table, its lookup and the script that regenerates it."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

import pytest

from exporter.products import TABLE_COLUMNS, parse_table, product_name, product_table

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "update_product_names.py"
TABLE = ROOT / "exporter" / "data" / "products.csv"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("update_product_names", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("part", "sku_id", "expected"),
    [
        ("INTUNE_A", None, "Intune"),
        ("INTUNE_A", "061f9ace-7d42-4136-88ac-31dc755f143f", "Intune"),
        ("ENTERPRISEPACK", None, "Office 365 E3"),
        ("intune_a", None, "Intune"),  # part numbers compare case-insensitively
        ("SPE_E5", None, "Microsoft 365 E5"),
        ("EMSPREMIUM", None, "Enterprise Mobility + Security E5"),
        # A renamed part number is still found by its GUID (any case, with braces).
        ("ENTERPRISEPACK_RENAMED", "{6FD2C87F-B296-42F0-B197-1E91E994B900}", "Office 365 E3"),
        ("CONTOSO_CUSTOM_SKU", None, "CONTOSO_CUSTOM_SKU"),
        ("CONTOSO_CUSTOM_SKU", "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9", "CONTOSO_CUSTOM_SKU"),
    ],
)
def test_product_name(part: str, sku_id: str | None, expected: str) -> None:
    assert product_name(part, sku_id) == expected


def test_table_has_the_brief_skus() -> None:
    table = product_table()
    for part in (
        "INTUNE_A",
        "ENTERPRISEPACK",
        "EMS",
        "EMSPREMIUM",
        "SPE_E3",
        "SPE_E5",
        "ENTERPRISEPREMIUM",
        "AAD_PREMIUM",
        "AAD_PREMIUM_P2",
        "FLOW_FREE",
        "POWER_BI_STANDARD",
        "STANDARDPACK",
        "O365_BUSINESS_PREMIUM",
        "SPB",
        "DEVELOPERPACK_E5",
    ):
        assert table.name(part) not in (None, part), part


def test_shipped_table_is_well_formed_and_canonical() -> None:
    text = TABLE.read_text(encoding="utf-8")
    assert not text.startswith("\ufeff")
    rows = list(csv.DictReader(text.splitlines()))
    assert tuple(rows[0].keys()) == TABLE_COLUMNS
    for row in rows:
        assert row["sku_part_number"] and row["product_name"], row
        if row["sku_id"]:
            assert row["sku_id"] == str(uuid.UUID(row["sku_id"])), row
    assert len({row["sku_part_number"].casefold() for row in rows}) == len(rows)
    ids = [row["sku_id"] for row in rows if row["sku_id"]]
    assert len(set(ids)) == len(ids)
    script = _script()
    canonical = script.render(
        sorted(((r["sku_part_number"], r["sku_id"], r["product_name"]) for r in rows), key=script.sort_key)
    )
    assert text == canonical  # the same form the update script writes


LICENSING_CSV = (
    "\ufeffProduct_Display_Name,String_Id,GUID,Service_Plan_Name,Service_Plan_Id,Service_Plans_Included_Friendly_Names\n"
    "Intune,INTUNE_A,061f9ace-7d42-4136-88ac-31dc755f143f,INTUNE_A,c1ec4a95-1f05-45b3-a911-aa3fa01094f5,Microsoft Intune\n"
    "Office 365 E3,ENTERPRISEPACK,6FD2C87F-B296-42F0-B197-1E91E994B900,EXCHANGE_S_ENTERPRISE,"
    "efb87545-963c-4e0d-99df-69c6916d9eb0,Exchange Online (Plan 2)\n"
    "Office 365 E3,ENTERPRISEPACK,6FD2C87F-B296-42F0-B197-1E91E994B900,TEAMS1,"
    "57ff2da0-773e-42df-b2af-ffb7a2317929,Microsoft Teams\n"
    '"Microsoft\u00a0365 E3, Special",SPE_E3_SPECIAL\t,11111111-2222-4333-8444-555555555555,INTUNE_A,'
    "c1ec4a95-1f05-45b3-a911-aa3fa01094f5,Microsoft Intune\n"
    "Démo Produkt,DEMO_ÜBER,22222222-3333-4444-8555-666666666666,X,33333333-4444-4555-8666-777777777777,X\n"
)


def test_update_script_deduplicates_a_bom_csv(tmp_path: Path) -> None:
    source = tmp_path / "licensing.csv"
    source.write_bytes(LICENSING_CSV.encode("utf-8"))
    output = tmp_path / "products.csv"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(source), "--output", str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 4 products" in result.stdout
    text = output.read_text(encoding="utf-8")
    assert text.splitlines() == [
        "sku_part_number,sku_id,product_name",
        "DEMO_ÜBER,22222222-3333-4444-8555-666666666666,Démo Produkt",
        "ENTERPRISEPACK,6fd2c87f-b296-42f0-b197-1e91e994b900,Office 365 E3",
        "INTUNE_A,061f9ace-7d42-4136-88ac-31dc755f143f,Intune",
        'SPE_E3_SPECIAL,11111111-2222-4333-8444-555555555555,"Microsoft 365 E3, Special"',
    ]
    table = parse_table(text)  # what the exporter would load
    assert table.name("SPE_E3_SPECIAL") == "Microsoft 365 E3, Special"
    assert table.name("X", "6fd2c87f-b296-42f0-b197-1e91e994b900") == "Office 365 E3"


def test_update_script_refuses_another_csv(tmp_path: Path) -> None:
    source = tmp_path / "other.csv"
    source.write_text("a,b,c\n1,2,3\n", encoding="utf-8")
    output = tmp_path / "products.csv"
    assert _script().main([str(source), "--output", str(output)]) == 1
    assert not output.exists()

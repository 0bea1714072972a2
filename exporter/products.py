"""Product names of license SKUs, for the ``sku_name`` label.

The table ``exporter/data/products.csv`` (columns ``sku_part_number,sku_id,product_name``) is derived
from Microsoft's "Product names and service plan identifiers for licensing" list;
``scripts/update_product_names.py`` regenerates it from the published CSV file. It is read once,
on first use.
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from importlib import resources

TABLE_COLUMNS = ("sku_part_number", "sku_id", "product_name")


@dataclass(frozen=True)
class ProductTable:
    by_part_number: dict[str, str]  # casefolded skuPartNumber -> product name
    by_sku_id: dict[str, str]  # lower-case skuId -> product name

    def name(self, sku_part_number: str, sku_id: str | None = None) -> str | None:
        found = self.by_part_number.get(sku_part_number.strip().casefold())
        if found is None and sku_id:
            found = self.by_sku_id.get(sku_id.strip().strip("{}").lower())
        return found


def parse_table(text: str) -> ProductTable:
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != TABLE_COLUMNS:
        raise ValueError(f"products table: expected columns {','.join(TABLE_COLUMNS)}")
    by_part: dict[str, str] = {}
    by_id: dict[str, str] = {}
    for row in reader:
        name = (row["product_name"] or "").strip()
        if not name:
            continue
        part = (row["sku_part_number"] or "").strip().casefold()
        sku_id = (row["sku_id"] or "").strip().lower()
        if part:
            by_part.setdefault(part, name)
        if sku_id:
            by_id.setdefault(sku_id, name)
    return ProductTable(by_part, by_id)


@functools.cache
def product_table() -> ProductTable:
    text = (resources.files("exporter") / "data" / "products.csv").read_text(encoding="utf-8")
    return parse_table(text)


def product_name(sku_part_number: str, sku_id: str | None = None) -> str:
    """The product name of a SKU (by part number, then by GUID), else the part number itself."""
    return product_table().name(sku_part_number, sku_id) or sku_part_number

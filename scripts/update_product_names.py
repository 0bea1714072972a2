#!/usr/bin/env python3
"""Regenerate exporter/data/products.csv from Microsoft's licensing CSV.

Download "Product names and service plan identifiers for licensing" (a CSV linked from the Entra
documentation page "licensing-service-plan-reference"), then run:

    python3 scripts/update_product_names.py "Product names and service plan identifiers for licensing.csv"

The published file is UTF-8 with a byte-order mark and has one row per service plan of each
product (columns Product_Display_Name, String_Id, GUID, Service_Plan_Name, ...). This keeps one row
per product (String_Id + GUID), strips the stray whitespace the file is known to contain (tabs,
non-breaking spaces) and writes ``sku_part_number,sku_id,product_name`` sorted by part number.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import uuid
from pathlib import Path

OUTPUT_COLUMNS = ("sku_part_number", "sku_id", "product_name")
INPUT_COLUMNS = ("Product_Display_Name", "String_Id", "GUID")
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "exporter" / "data" / "products.csv"


def clean(value: str | None) -> str:
    """A cell without surrounding whitespace; inner non-breaking spaces become plain spaces."""
    return " ".join((value or "").replace("\u00a0", " ").split())


def read_products(text: str) -> list[tuple[str, str, str]]:
    """(part number, lower-case GUID, product name) per product, first occurrence wins."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    missing = [column for column in INPUT_COLUMNS if column not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"not the licensing CSV: missing column(s) {', '.join(missing)}")
    products: dict[tuple[str, str], str] = {}
    for line, row in enumerate(reader, start=2):
        part = clean(row["String_Id"])
        name = clean(row["Product_Display_Name"])
        guid = clean(row["GUID"]).lower()
        if guid:
            try:
                guid = str(uuid.UUID(guid))
            except ValueError:
                raise ValueError(f"line {line}: GUID {guid!r} is not a GUID") from None
        if not part or not name:
            continue
        products.setdefault((part, guid), name)
    return sorted(((part, guid, name) for (part, guid), name in products.items()), key=sort_key)


def sort_key(row: tuple[str, str, str]) -> tuple[str, str]:
    return (row[0].casefold(), row[1])


def render(rows: list[tuple[str, str, str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(OUTPUT_COLUMNS)
    writer.writerows(rows)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("licensing_csv", type=Path, help="the CSV file published by Microsoft")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    args = parser.parse_args(argv)
    try:
        text = args.licensing_csv.read_text(encoding="utf-8-sig")
        rows = read_products(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        print(f"{args.licensing_csv}: {exc}", file=sys.stderr)
        return 1
    if not rows:
        print(f"{args.licensing_csv}: no products found", file=sys.stderr)
        return 1
    args.output.write_text(render(rows), encoding="utf-8")
    print(f"wrote {len(rows)} products to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

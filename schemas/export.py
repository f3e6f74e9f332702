"""Write the JSON Schema of every contract to schemas/json/<name>.json.

Run `python -m meterline.schemas.export` (or `make schemas`) after changing a model;
tests/test_schemas.py fails when the files drift from the models.
"""
from __future__ import annotations

import json
from pathlib import Path

from .events import CONTRACTS, priced_v2_doc

OUT = Path(__file__).resolve().parent / "json"


def render() -> dict[str, str]:
    """{file name: JSON text} for every contract, in a stable form."""
    out = {
        f"{name}.json": json.dumps(model.model_json_schema(mode="validation"), indent=2, sort_keys=True) + "\n"
        for name, model in CONTRACTS.items()
    }
    # priced.v2 is binary: its layout (field order and RowBinary types), not a JSON Schema
    out["priced_event.v2.json"] = json.dumps(priced_v2_doc(), indent=2) + "\n"
    return out


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()

"""The `soniq demo ...` programs (digits, minilm, quick)."""
from __future__ import annotations

import json
import os


def write_results(res: dict, out_dir: str, name: str, json_path: str | None, plot) -> tuple[str, str]:
    """Writes a demo's results as OUT/<name>_results.json (or json_path) and its plot as
    OUT/<name>_results.png; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = json_path or os.path.join(out_dir, f"{name}_results.json")
    with open(json_path, "w") as f:
        json.dump(res, f, indent=2)
    png = os.path.join(out_dir, f"{name}_results.png")
    plot(res, png)
    return json_path, png


def print_results(res: dict, json_stdout: bool, lines: list, json_path: str, png: str) -> None:
    """A demo's report: the results as JSON, or `lines` (its table and notes) followed by
    where the results were written and how long the demo took."""
    if json_stdout:
        print(json.dumps(res, indent=2))
        return
    for line in lines:
        print(line)
    print(f"saved {json_path} and {png} ({res['seconds']:.0f} s)")

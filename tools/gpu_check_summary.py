#!/usr/bin/env python3
"""summary.json for tools/gpu_check.sh: the GPU tier's test counts (from its JUnit XML),
tools/bench_train.py's and tools/bench_pel.py's figures (from their JSON), with exit codes and
times. Prints the summary. An input that is missing is None; one that cannot be read (a step killed
mid-write) is named in "input_errors" and the rest still summarized: summary.json is always written."""

import argparse
import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path


def test_counts(xml_path: Path, input_errors: list) -> dict:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "failures": []}
    if not xml_path.is_file():
        return {**counts, "report": "missing"}
    try:
        cases = list(ElementTree.parse(xml_path).getroot().iter("testcase"))
    except (OSError, ElementTree.ParseError) as error:  # empty or cut short: pytest killed mid-write
        input_errors.append(f"{xml_path}: {type(error).__name__}: {error}")
        return {**counts, "report": "unreadable"}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = {child.tag for child in case}
        if "failure" in outcome or "error" in outcome:
            counts["failed" if "failure" in outcome else "errors"] += 1
            counts["failures"].append(name)
        elif "skipped" in outcome:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def read_figures(path: Path, input_errors: list):
    """The JSON object at `path`: None if missing, or if unreadable (its error kept in `input_errors`)."""
    if not path.is_file():
        return None
    try:
        figures = json.loads(path.read_text())
        if not isinstance(figures, dict):
            raise ValueError(f"not a JSON object: {type(figures).__name__}")
        return figures
    except (OSError, ValueError) as error:  # empty or cut short: a step killed mid-write
        input_errors.append(f"{path}: {type(error).__name__}: {error}")
        return None


def _mfu_by_depth(bench: dict, prefix: str) -> dict:
    """{layers: MFU (or the run's error)} of the bench's "<prefix>_<layers>_layers" figures."""
    return {key.split("_")[1]: value.get("mfu", value.get("error"))
            for key, value in bench.items() if key.startswith(prefix + "_") and key.endswith("_layers")}


def _time_shares_by_depth(bench: dict, prefix: str) -> dict:
    """{layers: time shares} of the profiled "<prefix>_<layers>_layers" figures."""
    return {m[1]: value["profile"]["time_shares"]
            for key, value in bench.items() if (m := re.fullmatch(prefix + r"_(\d+)_layers", key)) and "profile" in value}


def _mfu_by_micro_batches(bench: dict, prefix: str) -> dict:
    """{"<layers> layers, <count> micro-batches": MFU (or the run's error)} of the bench's
    "<prefix>_<layers>_layers_<count>_micro_batches" figures."""
    return {f"{m[1]} layers, {m[2]} micro-batches": value.get("mfu", value.get("error"))
            for key, value in bench.items() if (m := re.fullmatch(prefix + r"_(\d+)_layers_(\d+)_micro_batches", key))}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--junit", type=Path, required=True, help="the GPU tier's JUnit XML")
    for name in ("tier-rc", "tier-seconds", "bench-rc", "bench-seconds", "pel-rc", "pel-seconds", "total-seconds"):
        parser.add_argument(f"--{name}", type=int, required=True)
    args = parser.parse_args()
    input_errors = []
    bench, pel = (read_figures(args.out / name, input_errors) for name in ("bench.json", "pel.json"))
    summary = {
        "device": (bench or {}).get("device"),
        "input_errors": input_errors,
        "tests": {**test_counts(args.junit, input_errors), "exit_code": args.tier_rc, "seconds": args.tier_seconds},
        "bench": {"exit_code": args.bench_rc, "seconds": args.bench_seconds, "figures": bench},
        "pel_bench": {"exit_code": args.pel_rc, "seconds": args.pel_seconds, "figures": pel},
        "total_seconds": args.total_seconds,
    }
    if bench and "ours" in bench:
        ours = bench["ours"]
        summary.update(tokens_per_s_per_gpu=ours["tokens_per_s_per_gpu"], tflops_per_gpu=ours["tflops_per_gpu"],
                       mfu=ours["mfu"], peak_memory_gib=ours["peak_memory_gib"], speedup_vs_hf=bench.get("speedup"),
                       ours_fallback=bench.get("ours_fallback"),  # the first run's error, if it failed
                       time_shares=(bench.get("profile") or {}).get("time_shares"),
                       host_syncs_per_step=(bench.get("profile") or {}).get("host_syncs_per_step"),
                       ours_runs_tokens_per_s=bench.get("ours_runs_tokens_per_s"),
                       steady_mfu=(bench.get("ours_steady") or {}).get("mfu"),
                       mfu_at_layers=_mfu_by_depth(bench, "ours"),
                       mfu_at_micro_batches=_mfu_by_micro_batches(bench, "ours"),
                       deep_time_shares=_time_shares_by_depth(bench, "ours"),
                       combined_levers=bench.get("combined_levers"),
                       combined_mfu_at_layers=_mfu_by_depth(bench, "combined"),
                       combined_mfu_at_micro_batches=_mfu_by_micro_batches(bench, "combined"),
                       combined_time_shares=_time_shares_by_depth(bench, "combined"),
                       gain_of_lever={key.split("_", 1)[1]: value.get("gain_of_lever", value.get("error"))
                                      for key, value in bench.items() if key.startswith(("with_", "without_"))})
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

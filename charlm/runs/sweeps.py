"""The end of a sweep (``-m``): its jobs best first, printed as a table and written as ``sweep_summary.json``.

Hydra's sweepers keep each job's return value (the run's ``optimized_metric``) to themselves. ``SweepSummary``, a
Hydra callback (``hydra.callbacks`` in conf/train.yaml), writes each finished job's record into the sweep
directory (``.jobs/<num>.json``: a launcher may run the jobs in other processes), and when the sweep ends sorts
them by that metric, failed jobs last, with the Optuna sweeper's ``optimization_results.yaml`` (its best
parameters) where there is one. A sweeper that stops the sweep by raising a failed job's error (Hydra's basic
sweeper does once its jobs are done) never reaches ``on_multirun_end``: ``charlm-train`` calls ``summarize`` then.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from charlm.training.checkpoint import write_atomic

JOBS = ".jobs"  # one record per finished job
SUMMARY = "sweep_summary.json"
OPTUNA = "optimization_results.yaml"  # what the Optuna sweeper writes into the sweep directory


class SweepSummary(Callback):
    """Record every job of a sweep as it ends; print and write the summary when the sweep ends."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        record = job_record(config, job_return)
        path = Path(config.hydra.sweep.dir) / JOBS / f"{record['job']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda f: f.write(json.dumps(record).encode()))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        print(table(summarize(config.hydra.sweep.dir)))


def job_record(config: DictConfig, job_return: JobReturn) -> dict:
    """A finished job: its number, overrides, status, the value of its ``optimized_metric`` (None where it
    returned none, or a non-finite one) or its error, and its directory."""
    try:
        value, error = job_return.return_value, None  # raises the job's error if it failed
    except Exception as e:
        value, error = None, (str(e).strip().splitlines() or [type(e).__name__])[0]
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        value = float(value)
    else:
        value = None
    direction = OmegaConf.select(config, "hydra.sweeper.direction", default="minimize")
    if OmegaConf.is_list(direction):  # a multi-objective study: the table sorts by its first objective
        direction = direction[0]
    out, sweep = Path(config.hydra.runtime.output_dir), Path(config.hydra.sweep.dir)
    return {
        "job": int(config.hydra.job.num),
        "overrides": [str(o) for o in job_return.overrides or ()],
        "status": "failed" if error is not None else "completed",
        "value": value,
        "error": error,
        "dir": str(out.relative_to(sweep)) if out.is_relative_to(sweep) else str(out),
        "metric": str(config.get("optimized_metric", "val/loss")),
        "direction": "maximize" if str(direction).endswith("maximize") else "minimize",
    }


def summarize(sweep_dir: str | Path) -> dict:
    """Write ``sweep_summary.json`` from the jobs recorded in ``sweep_dir`` and return it: the metric and its
    direction, the overrides every job shares, the jobs best first (each with the overrides that set it apart),
    and the Optuna sweeper's results where it wrote them."""
    sweep = Path(sweep_dir)
    records = [json.loads(p.read_text()) for p in sorted((sweep / JOBS).glob("*.json"))]
    shared = set.intersection(*(set(r["overrides"]) for r in records)) if len(records) > 1 else set()
    metric = records[0]["metric"] if records else "val/loss"
    sign = -1.0 if records and records[0]["direction"] == "maximize" else 1.0

    def rank(r: dict) -> tuple:  # finished with a value by it, then finished without one, then failed
        done = r["status"] == "completed"
        return (not done, r["value"] is None, sign * (r["value"] or 0.0), r["job"])

    jobs = [
        {k: v for k, v in r.items() if k not in ("metric", "direction")}
        | {"overrides": [o for o in r["overrides"] if o not in shared]}
        for r in sorted(records, key=rank)
    ]
    summary = {
        "sweep_dir": str(sweep),
        "metric": metric,
        "direction": "maximize" if sign < 0 else "minimize",
        "shared_overrides": [o for o in records[0]["overrides"] if o in shared] if records else [],
        "jobs": jobs,
    }
    if (sweep / OPTUNA).is_file():
        summary["optuna"] = OmegaConf.to_container(OmegaConf.load(sweep / OPTUNA))
    text = json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
    write_atomic(sweep / SUMMARY, lambda f: f.write(text.encode()))
    return summary


def table(summary: dict) -> str:
    """The summary as the terminal shows it: one line per job, best first, failed jobs last with their error."""
    metric, jobs = summary["metric"], summary["jobs"]
    best = "highest" if summary["direction"] == "maximize" else "lowest"
    lines = [f"sweep of {len(jobs)} job(s), {best} {metric} first:", f"  {'job':>4}  {metric:>10}  overrides"]
    for job in jobs:
        value = "-" if job["value"] is None else f"{job['value']:.4f}"
        value = "failed" if job["status"] == "failed" else value
        what = " ".join(job["overrides"]) or "-"
        error = f"  ({job['error']})" if job["error"] else ""
        lines.append(f"  {job['job']:>4}  {value:>10}  {what}{error}")
    optuna = summary.get("optuna") or {}
    if "best_params" in optuna:
        params = " ".join(f"{k}={v}" for k, v in optuna["best_params"].items())
        lines.append(f"optuna's best: {params} ({metric} {optuna['best_value']:.4f})")
    lines.append(f"summary: {Path(summary['sweep_dir']) / SUMMARY}")
    return "\n".join(lines)

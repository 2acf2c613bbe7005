"""`dlm slurm status RUN_DIR`: the state of every job of the run's last `dlm slurm submit` or
`dlm slurm pipeline` (<run.dir>/slurm/jobs.json), and which stage failed.

A job's state comes from slurmctld (`scontrol show job`) while it knows the job, else from
accounting (`sacct`) where the cluster keeps it, else from the outcome the job recorded
itself (slurm/launch.sh: status-<stage>[-<task>].json). An array job's state is that of its
tasks: failed if one failed, running while one runs. Exit code: 0 when nothing failed
(finished or still under way), 1 when a stage failed or was cancelled, 2 without a record.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pretrain.slurm import JOBS

DONE, UNDER_WAY = {"COMPLETED"}, {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED"}


def scontrol_records(job: str) -> list[dict]:
    """One {key: value} per job (per array task) of `scontrol show job -o`; [] once forgotten."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    if proc.returncode != 0:
        return []
    return [
        dict(f.split("=", 1) for f in line.split() if "=" in f) for line in proc.stdout.splitlines() if line
    ]


def sacct_records(job: str) -> list[dict]:
    """The same from accounting, where the cluster keeps it ([] otherwise)."""
    fields = "JobID,State,ExitCode"
    try:
        proc = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-j", job, f"--format={fields}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 2]
    if proc.returncode != 0:
        return []
    return [{"JobId": r[0], "JobState": r[1].split()[0], "ExitCode": r[2], "Reason": "None"} for r in rows]


def recorded(state_dir: Path, stage: str, job: str) -> list[dict]:
    """The outcomes the stage's jobs wrote themselves (slurm/launch.sh `dlm_record`)."""
    states = {"done": "COMPLETED", "failed": "FAILED", "requeued": "REQUEUED"}
    rows = []
    for path in sorted(state_dir.glob(f"status-{stage}*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if job in (record.get("job"), record.get("array_job")):
            rows.append(
                {"JobState": states.get(record.get("outcome"), "UNKNOWN"), "ExitCode": f"{record['exit']}:0"}
            )
    return rows


def job_state(state_dir: Path, entry: dict) -> dict:
    """{state, exit, reason, tasks: {state: count}} of one submitted job (all its array tasks)."""
    rows = (
        scontrol_records(entry["job"])
        or sacct_records(entry["job"])
        or recorded(state_dir, entry["stage"], entry["job"])
    )
    if not rows:
        return {
            "state": "UNKNOWN",
            "exit": "",
            "reason": "forgotten by slurmctld, no sacct or record",
            "tasks": {},
        }
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.get("JobState", "UNKNOWN")] = counts.get(row.get("JobState", "UNKNOWN"), 0) + 1
    worst = next((r for r in rows if r.get("JobState") not in DONE | UNDER_WAY), None)
    live = next((r for r in rows if r.get("JobState") in UNDER_WAY), None)
    row = worst or live or rows[0]
    state = row.get("JobState", "UNKNOWN")
    if entry.get("tasks", 1) > 1 and not worst and not live and sum(counts.values()) < entry["tasks"]:
        state = "UNKNOWN"  # some array tasks are no longer known
    reason = row.get("Reason", "None")
    return {
        "state": state,
        "exit": row.get("ExitCode", ""),
        "reason": "" if reason == "None" else reason,
        "tasks": counts,
    }


def report(run_dir: Path) -> tuple[list[str], int]:
    """The status lines and the exit code."""
    path = run_dir / "slurm" / JOBS
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [f"dlm slurm status: no submission recorded in {path} ({e})"], 2
    lines = [
        f"{run_dir}: submitted {record['submitted']}",
        f"{'stage':<10} {'job':<8} {'state':<12} exit  detail",
    ]
    failed = None
    for entry in record["jobs"]:
        st = job_state(path.parent, entry)
        tasks = (
            ", ".join(f"{n} {s.lower()}" for s, n in sorted(st["tasks"].items()))
            if entry.get("tasks", 1) > 1
            else ""
        )
        detail = "; ".join(x for x in (tasks, st["reason"]) if x)
        lines.append(f"{entry['stage']:<10} {entry['job']:<8} {st['state']:<12} {st['exit']:<5} {detail}")
        if failed is None and st["state"] not in DONE | UNDER_WAY | {"UNKNOWN"}:
            failed = (entry, st)
    if failed:
        entry, st = failed
        lines.append(
            f"FAILED at stage {entry['stage']} (job {entry['job']}, {st['state']}, exit {st['exit']}): "
            f"see {entry['log']}"
        )
        return lines, 1
    states = [line.split()[2] for line in lines[2:]]
    lines.append("all stages completed" if all(s in DONE for s in states) else "under way")
    return lines, 0


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: dlm slurm status RUN_DIR", file=sys.stderr)
        return 2
    lines, code = report(Path(argv[0]).resolve())
    print("\n".join(lines))
    return code

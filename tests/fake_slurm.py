"""A stand-in SLURM for tests: ``sbatch``, ``srun``, ``sacct`` and ``scancel`` executables that run a
submitted batch script on this machine, so hydra's ``submitit_slurm`` launcher goes through its real path
(sbatch script with its ``#SBATCH`` lines and setup, ``srun`` with its output files, job states from ``sacct``).

``sbatch SCRIPT`` copies the script, records its tasks (the ``--array``, or one) as PENDING, prints ``Submitted
batch job N`` and returns; a detached process then runs the tasks one after the other, each once submitit's
pickle for it is in place, with the environment SLURM gives a task (``SLURM_ARRAY_JOB_ID``,
``SLURM_ARRAY_TASK_ID``, ``SLURM_JOB_ID``, ...), recording RUNNING, then COMPLETED or FAILED.
``srun --output O --error E CMD...`` runs CMD with its output appended to O and E (``%A``, ``%a``, ``%j`` and
``%t`` expanded). ``sacct ... -j N`` prints the recorded states in ``--parsable2`` form.
"""

from __future__ import annotations

import sys
from pathlib import Path

SBATCH = r"""
import os, re, shlex, subprocess, sys, time
from pathlib import Path

state = Path(os.environ["FAKE_SLURM_STATE"])


def record(name, value):
    # atomically: sacct never reads a half-written state
    tmp = state / f".state_{name}.tmp"
    tmp.write_text(value)
    os.replace(tmp, state / f"state_{name}")


def tasks(text):
    array = re.search(r"^#SBATCH --array=(\d+)-(\d+)", text, re.M)
    return list(range(int(array[1]), int(array[2]) + 1)) if array else [None]


def run(job, script):
    # the tasks of a submitted job, one after the other, each once submitit has put its pickle in place
    text = Path(script).read_text()
    folder = shlex.split(re.search(r"submitit\.core\._submit (.+)$", text, re.M)[1])[0]
    for task in tasks(text):
        name = job if task is None else f"{job}_{task}"
        pickle = Path(folder.replace("%j", name)) / f"{name}_submitted.pkl"
        for _ in range(600):
            if pickle.is_file():
                break
            time.sleep(0.1)
        else:
            record(name, "FAILED")  # submitit never wrote the task's pickle
            continue
        env = dict(os.environ, SLURM_JOB_ID=job if task is None else f"{job}{task:03d}", SLURM_NTASKS="1",
                   SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0", SLURM_JOB_NODELIST="localhost",
                   SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_ARRAY_JOB_ID=job)
        if task is not None:
            env["SLURM_ARRAY_TASK_ID"] = str(task)
        record(name, "RUNNING")
        code = subprocess.run(["bash", script], env=env).returncode
        record(name, "COMPLETED" if code == 0 else "FAILED")


if sys.argv[1] == "--run":
    run(sys.argv[2], sys.argv[3])
    sys.exit(0)
text = Path(sys.argv[-1]).read_text()
job = str(1000 + len(list(state.glob("job_*.sh"))))
copy = state / f"job_{job}.sh"
copy.write_text(text)
for task in tasks(text):
    record(job if task is None else f"{job}_{task}", "PENDING")
subprocess.Popen([sys.executable, __file__, "--run", job, str(copy)], start_new_session=True,
                 stdout=subprocess.DEVNULL, stderr=open(state / f"job_{job}.err", "w"))
print(f"Submitted batch job {job}")
"""

SRUN = r"""
import os, subprocess, sys

args, files = sys.argv[1:], {}
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag in ("--output", "--error"):
        files[flag] = args.pop(0)
env = os.environ
values = {"%A": env.get("SLURM_ARRAY_JOB_ID", ""), "%a": env.get("SLURM_ARRAY_TASK_ID", ""),
          "%j": env["SLURM_JOB_ID"], "%t": "0"}
for flag, path in files.items():
    for key, value in values.items():
        path = path.replace(key, value)
    files[flag] = open(path, "a")
out = files.get("--output")
sys.exit(subprocess.run(args, stdout=out, stderr=files.get("--error", out)).returncode)
"""

SACCT = r"""
import os, sys
from pathlib import Path

state = Path(os.environ["FAKE_SLURM_STATE"])
jobs = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"]
print("JobID|State|NodeList")
for job in jobs:
    for path in sorted(state.glob(f"state_{job}*")):
        print(f"{path.name[len('state_'):]}|{path.read_text()}|localhost")
"""


def install(bin_dir: Path, state_dir: Path) -> dict[str, str]:
    """Write the four executables into ``bin_dir``; returns the environment to run the launcher with
    (``PATH`` first through ``bin_dir``, ``FAKE_SLURM_STATE`` where jobs and states are recorded)."""
    import os

    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name, body in {"sbatch": SBATCH, "srun": SRUN, "sacct": SACCT, "scancel": "pass\n"}.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM_STATE": str(state_dir)}

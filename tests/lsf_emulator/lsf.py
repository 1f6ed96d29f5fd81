#!/usr/bin/env python3
"""An emulated IBM Spectrum LSF for testing Snakemake profiles without a cluster.

Small stand-ins for the LSF commands that snakemake-executor-plugin-lsf calls (``badmin``,
``lsclusters``, ``bsub``, ``bjobs``, ``bhist``, ``bkill``) plus ``bstop``/``bresume``, with
LSF's output formats. Each submitted job runs on this machine in the background: a detached
runner process (its own session, stdout/stderr appended to the ``-o`` file) runs the command
with ``/bin/sh -c`` in the ``-cwd`` directory and the submitting environment (``-env all``),
plus ``LSB_JOBID``, ``LSB_DJOB_NUMPROC`` (the ``-n`` slots) and friends, and appends an LSF
style job report to the output file when it ends.

State lives in the directory named by ``$LSF_EMULATOR_DIR``: ``commands.log`` (one JSON line
per command invocation: argv, cwd, time), ``jobs/<id>.json`` (one record per job: parsed
options, environment, status, exit code, times, status history), ``config.json`` (see
:func:`configure`) and a fake ``LSF_CONFDIR``/``LSB_SHAREDIR``. Standard library only.

Set up with ``python lsf.py install BIN_DIR`` (or :func:`install`), which writes one small
executable per command into ``BIN_DIR``; put it first on ``PATH``.

Emulated cluster behaviour, set in ``config.json`` through :func:`configure`:

* ``max_running``: at most this many jobs RUN at once; the rest PEND (dispatch happens when a
  command runs or a job ends, like a scheduling cycle).
* ``queues``: ``{name: {"gpus": n}}``; submitting to another queue, or with ``-gpu`` to a
  queue without GPUs, is refused as LSF refuses it. Empty: any queue is accepted.
* ``default_queue``: written to ``lsb.params`` as ``DEFAULT_QUEUE``.
* ``faults``: a list of injected events, each ``{"job_name": substring, ...}`` plus one of
    - ``"memlimit_mb": M``: a matching job whose total memory request (``rusage[mem]`` times
      slots, LSF's default per-slot reservation) is below ``M`` is killed shortly after it
      starts, as LSF kills a job over its memory limit (TERM_MEMLIMIT, exit code 130);
    - ``"suspend": {"state": "SSUSP" | "USUSP", "after": s, "seconds": s}``: the job's
      processes are stopped (SIGSTOP) ``after`` seconds into the run and resumed (SIGCONT)
      ``seconds`` later, but not before bjobs has reported the state once (unless
      ``"until_reported": false``); bjobs reports the state meanwhile;
    - ``"die_writing": pattern``: the job dies (SIGKILL to its process group, as a node
      failure or ``kill -9`` leaves it) in the middle of writing the first file whose path
      matches the glob ``pattern``: half the first write reaches the file, the rest never
      does. Every Python process of the job loads :data:`SITECUSTOMIZE`, which wraps
      ``open`` for that path: a job killed mid-write, deterministically, whatever the timing;
  optionally ``"times": n`` limits how often the fault fires (default: every matching job).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import getpass
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CLUSTER = "emulated"
COMMANDS = ("badmin", "lsclusters", "bsub", "bjobs", "bhist", "bkill", "bstop", "bresume")
FIRST_JOB_ID = 1001

# bsub options that take a value (LSF 10.1), and those that do not
BSUB_VALUE_OPTS = {
    "-J", "-o", "-oo", "-e", "-eo", "-env", "-P", "-q", "-W", "-n", "-R", "-gpu", "-cwd", "-M",
    "-G", "-app", "-m", "-w", "-u", "-L", "-sla", "-c", "-We", "-b", "-t", "-g", "-i", "-is",
    "-E", "-Ep", "-C", "-D", "-S", "-v", "-F", "-sp", "-mig", "-Lp", "-U", "-jsdl", "-k",
    "-outdir", "-hostfile", "-alloc_flags", "-rnc", "-eptl", "-ptl", "-ext", "-Jd", "-f", "-a",
}
BSUB_FLAGS = {"-B", "-H", "-I", "-Ip", "-Is", "-IS", "-ISp", "-ISs", "-IX", "-K", "-N", "-r",
              "-rn", "-ul", "-x", "-Zs", "-tty", "-XF", "-hl"}

MEMLIMIT_EXIT = 130  # what LSF reports for a job killed at its memory limit (TERM_MEMLIMIT)


class LSFError(Exception):
    """A refused command: the message goes to stderr, exit status 255 (LSF's)."""


# ----------------------------------------------------------------------------------------
# state

def state_dir() -> Path:
    value = os.environ.get("LSF_EMULATOR_DIR")
    if not value:
        raise LSFError("LSF_EMULATOR_DIR is not set: the emulated LSF keeps its state there")
    path = Path(value)
    (path / "jobs").mkdir(parents=True, exist_ok=True)
    return path


def read_config(state: Path) -> dict:
    path = state / "config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config.setdefault("max_running", 4)
    config.setdefault("queues", {})
    config.setdefault("default_queue", "normal")
    config.setdefault("faults", [])
    return config


def configure(state: str | Path, **settings) -> Path:
    """Create (or update) an emulated cluster's state directory; see the module docstring."""
    state = Path(state)
    (state / "jobs").mkdir(parents=True, exist_ok=True)
    config = read_config(state)
    config.update(settings)
    for i, fault in enumerate(config["faults"]):
        fault.setdefault("id", i)
    _write_json(state / "config.json", config)
    _write_lsf_conf(state, config)
    return state


def _write_lsf_conf(state: Path, config: dict) -> None:
    confdir = state / "conf" / "lsbatch" / CLUSTER / "configdir"
    confdir.mkdir(parents=True, exist_ok=True)
    (confdir / "lsb.params").write_text(
        "# emulated lsb.params\nBegin Parameters\n"
        f"DEFAULT_QUEUE = {config['default_queue']}   # default job queue name\n"
        "End Parameters\n"
    )
    logdir = state / "share" / CLUSTER / "logdir"
    logdir.mkdir(parents=True, exist_ok=True)
    (logdir / "lsb.events").touch()


@contextlib.contextmanager
def locked(state: Path):
    with open(state / "lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def load_job(state: Path, jobid: int | str) -> dict:
    return json.loads((state / "jobs" / f"{int(jobid)}.json").read_text())


def save_job(state: Path, job: dict) -> None:
    _write_json(state / "jobs" / f"{job['jobid']}.json", job)


def all_jobs(state: Path) -> list[dict]:
    jobs = []
    for path in (state / "jobs").glob("*.json"):
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            jobs.append(json.loads(path.read_text()))
    return sorted(jobs, key=lambda j: j["jobid"])


def set_status(state: Path, jobid: int, stat: str | None, **fields) -> dict:
    """Update a job record: its fields, and its state unless ``stat`` is None."""
    with locked(state):
        job = load_job(state, jobid)
        job.update(fields)
        if stat is not None and job["stat"] != stat:
            job["stat"] = stat
            job["history"].append([round(time.time(), 3), stat])
        save_job(state, job)
        return job


def log_command(state: Path, name: str, args: list[str]) -> None:
    line = json.dumps({"time": round(time.time(), 3), "cwd": os.getcwd(), "argv": [name, *args]})
    with open(state / "commands.log", "a") as fh:
        fh.write(line + "\n")


# ----------------------------------------------------------------------------------------
# commands

def cmd_badmin(state: Path, args: list[str]) -> int:
    if args[:2] != ["showconf", "mbd"]:
        raise LSFError(f"badmin: emulated only as `badmin showconf mbd`, got {args}")
    print(f"MBD configuration at {time.strftime('%a %b %d %H:%M:%S %Y')}")
    for key, value in {
        "LSB_SHAREDIR": state / "share",
        "LSF_CONFDIR": state / "conf",
        "LSF_UNIT_FOR_LIMITS": "MB",
        "LSB_JOB_MEMLIMIT": "Y",
        "LSF_VERSION": "10.1",
    }.items():
        print(f"    {key} = {value}")
    return 0


def cmd_lsclusters(state: Path, args: list[str]) -> int:
    print(f"{'CLUSTER_NAME':<15}{'STATUS':<9}{'MASTER_HOST':<26}{'ADMIN':<9}{'HOSTS':<7}SERVERS")
    print(f"{CLUSTER:<15}{'ok':<9}{socket.gethostname():<26}{'lsfadmin':<9}{1:<7}1")
    return 0


def parse_bsub(args: list[str]) -> dict:
    """bsub's command line as {option: value or [values] for -R, ..., "command": str}."""
    opts: dict = {"-R": []}
    i = 0
    while i < len(args) and args[i].startswith("-"):
        opt = args[i]
        if opt in BSUB_VALUE_OPTS:
            if i + 1 >= len(args):
                raise LSFError(f"bsub: option {opt} requires an argument. Job not submitted.")
            if opt == "-R":
                opts["-R"].append(args[i + 1])
            else:
                opts[opt] = args[i + 1]
            i += 2
        elif opt in BSUB_FLAGS:
            opts[opt] = True
            i += 1
        else:
            raise LSFError(f"bsub: illegal option -- {opt.lstrip('-')}. Job not submitted.")
    if i >= len(args):
        raise LSFError("bsub: no command given (interactive job submission is not emulated)")
    # LSF runs the rest of the line as the command
    opts["command"] = args[i] if len(args) == i + 1 else shlex.join(args[i:])
    return opts


def _minutes(walltime: str) -> int:
    """-W [hour:]minute[/host_name] in minutes."""
    spec = walltime.split("/")[0]
    m = re.fullmatch(r"(?:(\d+):)?(\d+)", spec)
    if not m:
        raise LSFError(f"{walltime}: Bad RUNLIMIT specification. Job not submitted.")
    return int(m.group(1) or 0) * 60 + int(m.group(2))


def _rusage_mem(requirements: list[str]) -> float | None:
    for req in requirements:
        m = re.search(r"rusage\[[^\]]*\bmem=([0-9.]+)", req)
        if m:
            return float(m.group(1))
    return None


def _job_env(spec: str) -> dict[str, str]:
    """The job environment for -env: 'all', 'none', or 'all, VAR=value, ...'."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    base = {}
    if "all" in items or not items:
        base = dict(os.environ)
    elif "none" in items:
        base = {k: os.environ[k] for k in ("PATH", "HOME", "USER", "LOGNAME") if k in os.environ}
    for item in items:
        if "=" in item:
            key, value = item.split("=", 1)
            base[key] = value
        elif item not in ("all", "none"):
            base[item] = os.environ.get(item, "")
    return base


def cmd_bsub(state: Path, args: list[str]) -> int:
    opts = parse_bsub(args)
    config = read_config(state)
    queue = opts.get("-q") or config["default_queue"]
    queues = config["queues"]
    if queues and queue not in queues:
        raise LSFError(f"{queue}: No such queue. Job not submitted.")
    gpus = None
    if "-gpu" in opts:
        m = re.search(r"num=(\d+)", opts["-gpu"])
        gpus = int(m.group(1)) if m else 1
        if queues and gpus > queues[queue].get("gpus", 0):
            raise LSFError(f"-gpu {opts['-gpu']}: queue <{queue}> has no hosts with {gpus} GPU(s). "
                           "Job not submitted.")
    slots = int(opts.get("-n", 1))
    mem = _rusage_mem(opts["-R"])
    job = {
        "jobid": None,
        "name": opts.get("-J", opts["command"].split()[0]),
        "user": getpass.getuser(),
        "queue": queue,
        "project": opts.get("-P", "default"),
        "slots": slots,
        "rusage_mem": mem,
        "mem_total_mb": None if mem is None else mem * slots,
        "runlimit_min": _minutes(opts["-W"]) if "-W" in opts else None,
        "gpus": gpus,
        "requirements": opts["-R"],
        "options": {k: v for k, v in opts.items() if k != "command"},
        "command": opts["command"],
        "cwd": opts.get("-cwd", os.getcwd()),
        "output": opts.get("-o") or opts.get("-oo"),
        "env": _job_env(opts.get("-env", "all")),
        "argv": ["bsub", *args],
        "submit_time": round(time.time(), 3),
        "stat": "PEND",
        "history": [],
        "exit_code": None,
        "pgid": None,
        "fault": None,
    }
    with locked(state):
        counter = state / "next_jobid"
        jobid = int(counter.read_text()) if counter.exists() else FIRST_JOB_ID
        counter.write_text(str(jobid + 1))
        job["jobid"] = jobid
        job["history"].append([job["submit_time"], "PEND"])
        job["fault"] = _take_fault(state, config, job)
        for key in ("output",):
            if job[key]:
                job[key] = job[key].replace("%J", str(jobid)).replace("%I", "0")
        save_job(state, job)
    print(f"Job <{jobid}> is submitted to queue <{queue}>.")
    dispatch(state)
    return 0


def _take_fault(state: Path, config: dict, job: dict) -> dict | None:
    """The first configured fault matching this job that has not fired its `times` yet."""
    fired_path = state / "faults_fired.json"
    fired = json.loads(fired_path.read_text()) if fired_path.exists() else {}
    for fault in config["faults"]:
        if fault["job_name"] not in job["name"]:
            continue
        if "memlimit_mb" in fault and (job["mem_total_mb"] or 0) >= fault["memlimit_mb"]:
            continue
        key = str(fault["id"])
        if "times" in fault and fired.get(key, 0) >= fault["times"]:
            continue
        fired[key] = fired.get(key, 0) + 1
        _write_json(fired_path, fired)
        return fault
    return None


def dispatch(state: Path) -> None:
    """Start pending jobs while fewer than max_running run (one scheduling cycle)."""
    config = read_config(state)
    with locked(state):
        jobs = all_jobs(state)
        running = sum(j["stat"] in ("RUN", "SSUSP", "USUSP") for j in jobs)
        for job in jobs:
            if running >= config["max_running"]:
                break
            if job["stat"] != "PEND":
                continue
            job["stat"] = "RUN"
            job["start_time"] = round(time.time(), 3)
            job["history"].append([job["start_time"], "RUN"])
            save_job(state, job)
            _spawn_runner(state, job)
            running += 1


def _spawn_runner(state: Path, job: dict) -> None:
    out = job["output"] or os.devnull
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "ab") as fh:
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "_run", str(job["jobid"])],
            stdin=subprocess.DEVNULL, stdout=fh, stderr=fh, start_new_session=True,
            env={**os.environ, "LSF_EMULATOR_DIR": str(state)}, cwd="/",
        )


#: Loaded (as ``sitecustomize``) by the Python processes of a job with a ``die_writing`` fault.
SITECUSTOMIZE = """\
import builtins, fnmatch, io, os, signal

_pattern = os.environ.get("LSF_EMULATOR_DIE_WRITING")
_open = io.open


class _DyingFile:
    def __init__(self, f):
        self._f = f

    def write(self, data):
        view = memoryview(data).cast("B")
        self._f.write(view[: len(view) // 2])
        self._f.flush()
        os.killpg(os.getpgrp(), signal.SIGKILL)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _dying_open(file, mode="r", *args, **kwargs):
    f = _open(file, mode, *args, **kwargs)
    if _pattern and isinstance(file, (str, os.PathLike)) and ("w" in mode or "a" in mode or "x" in mode) \
            and fnmatch.fnmatch(os.path.abspath(os.fspath(file)), _pattern):
        return _DyingFile(f)
    return f


if _pattern:
    io.open = builtins.open = _dying_open
"""


def run_job(state: Path, jobid: int) -> int:
    """The runner: execute one job as LSF's sbatchd would, then report and dispatch more."""
    job = load_job(state, jobid)
    env = {
        **job["env"],
        "LSB_JOBID": str(jobid),
        "LSB_JOBNAME": job["name"],
        "LSB_QUEUE": job["queue"],
        "LSB_DJOB_NUMPROC": str(job["slots"]),
        "LSB_MAX_NUM_PROCESSORS": str(job["slots"]),
        "LSB_HOSTS": " ".join([socket.gethostname()] * job["slots"]),
        "LSB_MCPU_HOSTS": f"{socket.gethostname()} {job['slots']}",
        "LSF_EMULATOR_DIR": str(state),
    }
    if job["gpus"]:
        env.setdefault("CUDA_VISIBLE_DEVICES", "")  # no GPU here; LSF would set the granted ids
    fault = job.get("fault") or {}
    if "die_writing" in fault:
        hooks = state / "die_writing"
        hooks.mkdir(exist_ok=True)
        (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
        pattern = os.path.join(job["cwd"], fault["die_writing"])
        env.update(LSF_EMULATOR_DIE_WRITING=pattern,
                   PYTHONPATH=os.pathsep.join(p for p in (str(hooks), env.get("PYTHONPATH")) if p))
    sys.stdout.flush()
    proc = subprocess.Popen(["/bin/sh", "-c", job["command"]], cwd=job["cwd"], env=env,
                            start_new_session=True)
    set_status(state, jobid, None, pgid=proc.pid, exec_host=socket.gethostname())
    term = None
    try:
        if "memlimit_mb" in fault:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=fault.get("after", 1.0))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                term = "TERM_MEMLIMIT: job killed after reaching LSF memory usage limit."
        elif "suspend" in fault:
            sus = fault["suspend"]
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=sus.get("after", 1.0))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGSTOP)
                state_name = sus.get("state", "SSUSP")
                set_status(state, jobid, state_name)
                deadline = time.time() + sus.get("seconds", 5.0)
                # stay suspended at least `seconds`, and until bjobs has shown the state
                while time.time() < deadline or (
                        sus.get("until_reported", True) and time.time() < deadline + 300
                        and state_name not in load_job(state, jobid).get("reported", [])):
                    time.sleep(0.2)
                os.killpg(proc.pid, signal.SIGCONT)
                set_status(state, jobid, "RUN")
        code = proc.wait()
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    current = load_job(state, jobid)
    if current["stat"] == "EXIT":  # bkill got there first
        dispatch(state)
        return 0
    if code < 0:
        code = 128 - code  # killed by a signal: LSF reports 128 + signal number
    if term:
        code = MEMLIMIT_EXIT
    stat = "DONE" if code == 0 else "EXIT"
    _job_report(job, stat, code, term)
    set_status(state, jobid, stat, exit_code=code, end_time=round(time.time(), 3), term=term)
    dispatch(state)
    return 0


def _job_report(job: dict, stat: str, code: int, term: str | None) -> None:
    host = socket.gethostname()
    subject = "Done" if stat == "DONE" else "Exited"
    lines = [
        "", "-" * 60,
        f"Sender: LSF System <lsfadmin@{host}>",
        f"Subject: Job {job['jobid']}: <{job['name']}> in cluster <{CLUSTER}> {subject}", "",
        f"Job <{job['name']}> was submitted from host <{host}> by user <{job['user']}> "
        f"in cluster <{CLUSTER}> at {time.ctime(job['submit_time'])}",
        f"Job was executed on host(s) <{job['slots']}*{host}>, in queue <{job['queue']}>, "
        f"as user <{job['user']}> in cluster <{CLUSTER}>.",
        f"<{job['cwd']}> was used as the working directory.", "",
    ]
    if term:
        lines.append(term)
    lines.append("Successfully completed." if code == 0 else f"Exited with exit code {code}.")
    lines += ["", "Resource usage summary:", "",
              f"    Total Requested Memory :                     {job['mem_total_mb']} MB", ""]
    print("\n".join(lines), flush=True)


def _parse_letters(args: list[str], with_value: set[str]) -> tuple[dict, list[str]]:
    """Parse LSF-style options where flags may be bundled (-aJ NAME) and long ones exist."""
    opts, rest, i = {}, [], 0
    long_value = {"-o", "-J", "-u", "-q", "-P", "-m", "-g"}
    while i < len(args):
        arg = args[i]
        if arg in long_value | {"-noheader", "-json", "-hms", "-w", "-l", "-W", "-a", "-d", "-r",
                                "-p", "-s", "-x", "-X"}:
            if arg in long_value:
                opts[arg] = args[i + 1]
                i += 2
            else:
                opts[arg] = True
                i += 1
            continue
        if arg.startswith("-") and len(arg) > 2 and not arg.startswith("--"):
            # bundled single letters: the last may take a value
            letters = arg[1:]
            for k, ch in enumerate(letters):
                opt = f"-{ch}"
                if opt in with_value:
                    value = letters[k + 1:] or args[i + 1]
                    opts[opt] = value
                    if not letters[k + 1:]:
                        i += 1
                    break
                opts[opt] = True
            i += 1
            continue
        rest.append(arg)
        i += 1
    return opts, rest


BJOBS_FIELDS = {
    "jobid": ("JOBID", 7, lambda j: j["jobid"]),
    "stat": ("STAT", 5, lambda j: j["stat"]),
    "user": ("USER", 7, lambda j: j["user"]),
    "queue": ("QUEUE", 10, lambda j: j["queue"]),
    "job_name": ("JOB_NAME", 10, lambda j: j["name"]),
    "name": ("JOB_NAME", 10, lambda j: j["name"]),
    "proj": ("PROJ_NAME", 11, lambda j: j["project"]),
    "project": ("PROJ_NAME", 11, lambda j: j["project"]),
    "exit_code": ("EXIT_CODE", 9, lambda j: "-" if j["exit_code"] is None else j["exit_code"]),
    "slots": ("SLOTS", 5, lambda j: j["slots"]),
    "nreq_slot": ("NREQ_SLOT", 9, lambda j: j["slots"]),
    "from_host": ("FROM_HOST", 11, lambda j: socket.gethostname()),
    "exec_host": ("EXEC_HOST", 11, lambda j: j.get("exec_host") or "-"),
    "submit_time": ("SUBMIT_TIME", 12, lambda j: time.strftime("%b %d %H:%M", time.localtime(j["submit_time"]))),
    "exit_reason": ("EXIT_REASON", 11, lambda j: j.get("term") or "-"),
}


def cmd_bjobs(state: Path, args: list[str]) -> int:
    dispatch(state)
    opts, ids = _parse_letters(args, {"-J", "-o", "-u", "-q", "-P", "-m", "-g"})
    jobs = all_jobs(state)
    if ids:
        wanted = {int(i) for i in ids if i.isdigit()}
        jobs = [j for j in jobs if j["jobid"] in wanted]
    elif not opts.get("-a") and not opts.get("-d"):
        jobs = [j for j in jobs if j["stat"] not in ("DONE", "EXIT")]
    if opts.get("-d"):
        jobs = [j for j in jobs if j["stat"] in ("DONE", "EXIT")]
    if "-J" in opts:
        jobs = [j for j in jobs if fnmatch.fnmatchcase(j["name"], opts["-J"])]
    if "-q" in opts:
        jobs = [j for j in jobs if j["queue"] == opts["-q"]]
    if not jobs:
        if "-J" in opts:
            print(f"Job <{opts['-J']}> is not found", file=sys.stderr)
            return 255
        print("No unfinished job found", file=sys.stderr)
        return 0
    fields = (opts.get("-o") or "jobid user stat queue from_host exec_host job_name submit_time").split()
    for f in fields:
        if f.split(":")[0].lower() not in BJOBS_FIELDS:
            raise LSFError(f"{f}: Illegal field name.")
    cols = [BJOBS_FIELDS[f.split(":")[0].lower()] for f in fields]
    if not opts.get("-noheader"):
        print(" ".join(f"{title:<{width}}" for title, width, _ in cols).rstrip())
    for job in jobs:
        print(" ".join(f"{str(get(job)):<{width}}" for _, width, get in cols).rstrip())
    _note_reported(state, jobs)
    return 0


def _note_reported(state: Path, jobs: list[dict]) -> None:
    """Record in each job which states bjobs has shown (for tests: was SSUSP ever seen?)."""
    with locked(state):
        for shown in jobs:
            job = load_job(state, shown["jobid"])
            reported = job.setdefault("reported", [])
            if not reported or reported[-1] != shown["stat"]:
                reported.append(shown["stat"])
                save_job(state, job)


def cmd_bhist(state: Path, args: list[str]) -> int:
    for job in all_jobs(state):
        print(f"Job <{job['jobid']}>, Job Name <{job['name']}>, User <{job['user']}>, "
              f"Project <{job['project']}>, Command <{job['command'][:40]}>")
        for t, stat in job["history"]:
            print(f"{time.ctime(t)}: {stat};")
        print("-" * 78)
    return 0


def _signal_jobs(state: Path, ids: list[str], sig: int, new_stat: str | None, verb: str) -> int:
    status = 0
    for text in ids:
        try:
            job = load_job(state, int(text))
        except (ValueError, FileNotFoundError):
            print(f"Job <{text}>: No matching job found", file=sys.stderr)
            status = 255
            continue
        if job["stat"] in ("DONE", "EXIT"):
            print(f"Job <{text}>: Job has already finished", file=sys.stderr)
            status = 255
            continue
        if job["pgid"]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job["pgid"], sig)
        if new_stat == "EXIT":
            set_status(state, job["jobid"], "EXIT", exit_code=130, term="TERM_OWNER: job killed by owner.",
                       end_time=round(time.time(), 3))
        elif new_stat:
            set_status(state, job["jobid"], new_stat)
        print(f"Job <{text}> is being {verb}")
    dispatch(state)
    return status


def cmd_bkill(state: Path, args: list[str]) -> int:
    return _signal_jobs(state, [a for a in args if not a.startswith("-")], signal.SIGKILL, "EXIT", "terminated")


def cmd_bstop(state: Path, args: list[str]) -> int:
    return _signal_jobs(state, [a for a in args if not a.startswith("-")], signal.SIGSTOP, "USUSP", "stopped")


def cmd_bresume(state: Path, args: list[str]) -> int:
    return _signal_jobs(state, [a for a in args if not a.startswith("-")], signal.SIGCONT, "RUN", "resumed")


def kill_all(state: str | Path) -> list[int]:
    """Kill every job still pending or running (test teardown); returns their ids."""
    state = Path(state)
    killed = []
    for job in all_jobs(state):
        if job["stat"] in ("DONE", "EXIT"):
            continue
        if job.get("pgid"):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job["pgid"], signal.SIGKILL)
        set_status(state, job["jobid"], "EXIT", term="TERM_OWNER: killed at emulator shutdown.")
        killed.append(job["jobid"])
    return killed


def commands(state: str | Path, name: str | None = None) -> list[list[str]]:
    """The logged command lines (argv lists), optionally only those of one command."""
    path = Path(state) / "commands.log"
    if not path.exists():
        return []
    lines = [json.loads(line)["argv"] for line in path.read_text().splitlines() if line.strip()]
    return [argv for argv in lines if name is None or argv[0] == name]


# ----------------------------------------------------------------------------------------
# entry points

def install(bin_dir: str | Path, python: str = sys.executable) -> Path:
    """Write one executable per emulated command into ``bin_dir`` (run with ``python``)."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    me = os.path.abspath(__file__)
    for name in COMMANDS:
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\nexec {shlex.quote(python)} {shlex.quote(me)} {name} \"$@\"\n")
        path.chmod(0o755)
    return bin_dir


def main(argv: list[str]) -> int:
    if not argv:
        print(f"usage: lsf.py {{install BIN_DIR | {' | '.join(COMMANDS)}}} ARGS...", file=sys.stderr)
        return 2
    name, args = argv[0], argv[1:]
    if name == "install":
        install(args[0] if args else Path(__file__).parent / "bin")
        return 0
    try:
        state = state_dir()
        if name == "_run":
            return run_job(state, int(args[0]))
        if name not in COMMANDS:
            raise LSFError(f"{name}: not an emulated LSF command ({', '.join(COMMANDS)})")
        log_command(state, name, args)
        if not (state / "config.json").exists():
            configure(state)
        return globals()[f"cmd_{name}"](state, args)
    except LSFError as err:
        print(err, file=sys.stderr)
        return 255


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

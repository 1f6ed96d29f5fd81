"""The cluster profiles, proven by running the tiny workflow through the real executor plugins.

* LSF: ``profiles/lsf`` drives snakemake-executor-plugin-lsf against an emulated LSF
  (``tests/lsf_emulator``: the same commands and output formats, jobs run here in the
  background). One run, next to a local reference run of the same project, checks every
  ``bsub`` line, the outputs, a retry after an out-of-memory kill and a suspension.
* SLURM: ``profiles/slurm`` drives snakemake-executor-plugin-slurm against a real one-node
  SLURM (slurmctld + slurmd + munged started in tmp_path); skipped where SLURM is not
  installed (Debian: ``apt-get install slurmctld slurmd slurm-client munge``).

The profiles are used as they are in the repository; only the CHANGE-ME placeholders are
substituted, and the runs are given faster status polling on the command line.
Unit tests of dinopipe.runtime's CPU allotment and of the emulator itself come first (fast).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dinopipe.runtime import allotted_cpus, batch_allotment
from lsf_emulator import lsf
from test_workflow import ROOT, SNAKEMAKE, VOLUMES, snakemake, tiny_config, write_project

# Placeholder values the tests substitute, and what each rule must be submitted with:
# rule -> (queue, GPUs, walltime in minutes, slots, total memory in MB at attempt 1).
PROJECT, CPU_QUEUE, GPU_QUEUE = "dinolab", "short", "gpu"
PLACEHOLDERS = {
    "lsf": {"CHANGE-ME-project": PROJECT, "CHANGE-ME-cpu-queue": CPU_QUEUE, "CHANGE-ME-gpu-queue": GPU_QUEUE},
    "slurm": {"CHANGE-ME-account": PROJECT, "CHANGE-ME-cpu-partition": CPU_QUEUE,
              "CHANGE-ME-gpu-partition": GPU_QUEUE},
}
EXPECTED = {
    "demo_data": (CPU_QUEUE, 0, 15, 1, 2000),
    "features": (GPU_QUEUE, 1, 240, 8, 32000),
    "targets": (CPU_QUEUE, 0, 240, 4, 32000),
    "train": (GPU_QUEUE, 1, 1440, 8, 64000),
    "predict": (GPU_QUEUE, 1, 240, 8, 32000),
    "segment": (CPU_QUEUE, 0, 240, 1, 64000),
    "evaluate": (CPU_QUEUE, 0, 60, 1, 16000),
    # the 4 metadata jobs in one submission, 4 at once: 4 slots, 4 x 8000 MB, 1 x 15 min
    "bookkeeping": (CPU_QUEUE, 0, 15, 4, 32000),
}
LOCAL_RULES = {"evaluation_summary", "all"}
SLURM_ACCOUNT = "myproject"  # the account of docs/cluster.md's per-run SLURM command
OOM_JOB, SUSPENDED_JOB = "rule_targets:volume=predict_0", "rule_features:volume=predict_0"
# files that legitimately differ between two runs: timings and what embeds them
# (the resumable state embeds the input stores' ids, new in every run; checkpoint.pt is compared)
VOLATILE_FILES = re.compile(r"(^benchmarks/|/\.zattrs$|/zarr\.json$|^metadata/|/events\.out\.tfevents|^model/state/latest\.pt$)")
EVENT_FILE = re.compile(r"(events\.out\.tfevents)\..*")  # TensorBoard names carry time, host and pid
VOLATILE_KEY = re.compile(r"(_s|_utc|_time)$|^peak_|^(timings|bytes|host|platform|pid|created|store_id)$")  # measurements


def profile_copy(name: str, directory: Path) -> Path:
    """profiles/<name> copied to directory with its placeholders filled in (nothing else changed)."""
    text = (ROOT / "profiles" / name / "config.yaml").read_text()
    for placeholder, value in PLACEHOLDERS[name].items():
        assert placeholder in text, f"profiles/{name}: placeholder {placeholder} missing"
        text = text.replace(placeholder, value)
    assert not re.findall(r"\"CHANGE-ME[\w-]*\"", text), "a placeholder value was not substituted"
    target = directory / f"profile-{name}"
    target.mkdir()
    (target / "config.yaml").write_text(text)
    return target


def cluster_snakemake(directory: Path, profile: Path, *args: str, env: dict, timeout: int = 600):
    """Snakemake as users run it on a cluster: the profile, no workflow profile, no --cores."""
    cmd = [*SNAKEMAKE, "--directory", str(directory), "--profile", str(profile),
           "--workflow-profile", "none", "--seconds-between-status-checks", "1", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    (directory / "snakemake.out").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return proc


def rule_of(job_name: str) -> str:
    """'Snakemake_rule_features:volume=x___(uuid)' -> 'features'; groups give the group name."""
    m = re.match(r"Snakemake_(?:rule|group)_([A-Za-z0-9_]+?)(?::|___\()", job_name)
    assert m, job_name
    return m.group(1)


def attempt_of(command: str) -> int:
    return int(re.search(r"--attempt (\d+)", command).group(1))


def stable(value):
    """A JSON value without the keys that change from run to run."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if not VOLATILE_KEY.search(k)}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def json_diff(a, b, path: str = "") -> list[str]:
    """The paths at which two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in json_diff(a.get(k), b.get(k), f"{path}/{k}")]
    return [] if a == b else [f"{path}: {str(a)[:60]} != {str(b)[:60]}"]


def assert_same_results(run: Path, reference: Path, only: str = "") -> None:
    """Same files under results/; byte-identical apart from timings."""
    def files(root):
        return {str(p.relative_to(root)) for p in (root / only).rglob("*")
                if p.is_file() and p.name != ".snakemake_timestamp"}
    got, want = files(run / "results"), files(reference / "results")
    names = lambda paths: sorted(EVENT_FILE.sub(r"\1", p) for p in paths)  # noqa: E731
    assert names(got) == names(want), f"only in cluster run: {sorted(got - want)}; only in local run: {sorted(want - got)}"
    for rel in sorted(want & got):
        a, b = run / "results" / rel, reference / "results" / rel
        if rel.startswith("metadata/"):
            differ = json_diff(stable(json.loads(a.read_text())), stable(json.loads(b.read_text())))
            assert not differ, f"{rel} differs from the local run at {differ}"
        elif not VOLATILE_FILES.search(rel):
            assert a.read_bytes() == b.read_bytes(), f"{rel} differs from the local run"


# ---------------------------------------------------------------------------------------------
# dinopipe.runtime: CPU allotment


def test_allotted_cpus_takes_the_smallest_limit(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert allotted_cpus(None, {}) == 16
    assert allotted_cpus(8, {}) == 8
    assert allotted_cpus(8, {"LSB_DJOB_NUMPROC": "4"}) == 4
    assert allotted_cpus(2, {"LSB_DJOB_NUMPROC": "4"}) == 2
    assert allotted_cpus(None, {"SLURM_CPUS_PER_TASK": "6", "SLURM_CPUS_ON_NODE": "12"}) == 6
    assert allotted_cpus(None, {"SLURM_CPUS_ON_NODE": "12"}) == 12
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # bound to 2 cores
    assert allotted_cpus(8, {"LSB_DJOB_NUMPROC": "8"}) == 2
    assert batch_allotment({}) is None


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True])
def test_allotted_cpus_rejects_bad_requests(bad):
    with pytest.raises(ValueError, match="requested threads"):
        allotted_cpus(bad, {})


def test_malformed_allotment_is_named():
    with pytest.raises(ValueError, match=r"LSB_DJOB_NUMPROC='eight'"):
        allotted_cpus(None, {"LSB_DJOB_NUMPROC": "eight"})


# ---------------------------------------------------------------------------------------------
# the LSF emulator, spoken to as the plugin speaks to it


@pytest.fixture
def emulated_lsf(tmp_path, monkeypatch) -> Path:
    state = lsf.configure(tmp_path / "lsf", max_running=2, queues={CPU_QUEUE: {}, GPU_QUEUE: {"gpus": 4}},
                          default_queue=CPU_QUEUE)
    bin_dir = lsf.install(tmp_path / "bin", python=sys.executable)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LSF_EMULATOR_DIR", str(state))
    yield state
    lsf.kill_all(state)


def sh(command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, capture_output=True, text=True, check=check)


def test_emulator_answers_in_lsf_formats(emulated_lsf, tmp_path):
    from snakemake_executor_plugin_lsf import Executor

    config = Executor.get_lsf_config()  # the plugin's own parsing of badmin, lsclusters, lsb.params
    assert config["DEFAULT_QUEUE"] == CPU_QUEUE and config["LSF_UNIT_FOR_LIMITS"] == "MB"
    assert Path(config["LSB_EVENTS"]).exists()
    out = sh(f"bsub -J 'Snakemake_rule_x___(u1)' -o {tmp_path}/x.log -e {tmp_path}/x.log -env all -q {GPU_QUEUE} "
             f"-W 5 -n 3 -R rusage[mem=100.0] -R span[hosts=1] -gpu \"num=1\" -cwd {tmp_path} "
             "'echo slots=$LSB_DJOB_NUMPROC; exit 3'").stdout
    jobid = re.search(r"Job <(\d+)> is submitted to queue <gpu>", out).group(1)
    for _ in range(300):
        status = sh("bjobs -noheader -o 'jobid stat' -aJ '*u1*'").stdout
        if "EXIT" in status:
            break
        time.sleep(0.1)
    assert status.split() == [jobid, "EXIT"]
    log = (tmp_path / "x.log").read_text()
    assert "slots=3" in log and "Exited with exit code 3." in log
    job = lsf.load_job(emulated_lsf, jobid)
    assert (job["queue"], job["slots"], job["mem_total_mb"], job["runlimit_min"], job["gpus"]) == (GPU_QUEUE, 3, 300, 5, 1)
    # refused as LSF refuses them
    assert "No such queue" in sh("bsub -q nosuch 'true'", check=False).stderr
    refused = sh(f"bsub -q {CPU_QUEUE} -gpu 'num=1' 'true'", check=False)
    assert refused.returncode == 255 and "GPU" in refused.stderr
    assert "illegal option" in sh("bsub -Z 'true'", check=False).stderr
    assert sh("bjobs -noheader -o 'jobid stat' -aJ '*nomatch*'", check=False).returncode == 255


def test_emulator_kills_and_suspends(emulated_lsf, tmp_path):
    jobid = re.search(r"Job <(\d+)>", sh("bsub -J sleeper 'sleep 30'").stdout).group(1)
    for _ in range(300):  # until the job's processes exist
        if lsf.load_job(emulated_lsf, jobid)["pgid"]:
            break
        time.sleep(0.1)
    assert "is being stopped" in sh(f"bstop {jobid}").stdout
    assert lsf.load_job(emulated_lsf, jobid)["stat"] == "USUSP"
    sh(f"bresume {jobid}")
    assert "is being terminated" in sh(f"bkill {jobid}").stdout
    assert sh(f"bjobs -noheader -o 'jobid stat' {jobid}").stdout.split() == [jobid, "EXIT"]
    assert [h[1] for h in lsf.load_job(emulated_lsf, jobid)["history"]] == ["PEND", "RUN", "USUSP", "RUN", "EXIT"]


# ---------------------------------------------------------------------------------------------
# profiles/slurm on a real one-node SLURM

SLURM_PROGRAMS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol", "srun", "scancel", "sinfo")


def _which(program: str) -> str | None:
    return shutil.which(program) or next(
        (str(p) for p in (Path("/usr/sbin") / program, Path("/usr/bin") / program) if p.exists()), None)


def _slurm_skip_reason() -> str | None:
    missing = [p for p in SLURM_PROGRAMS if not _which(p)]
    if missing:
        return (f"SLURM not installed (missing {', '.join(missing)}); on Debian: "
                "apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "the one-node SLURM needs root (slurmd runs jobs as their user; fake GPU device nodes)"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """slurmctld + slurmd + munged on this machine, configured and kept under tmp_path.

    One node with 16 CPUs, 500 GB and 4 GPUs declared (SlurmdParameters=config_overrides; the
    GPUs are character devices standing in for /dev/nvidia*), partitions `short` (default) and
    `gpu`, no accounting database (so the plugin queries squeue).
    """
    reason = _slurm_skip_reason()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    for d in ("ctld", "d", "run", "log", "bin"):
        (base / d).mkdir()
    key = base / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    socket_path = base / "run" / "munge.sock"
    gpus = []
    for i in range(4):
        dev = base / f"gpu{i}"
        os.mknod(dev, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
        gpus.append(str(dev))
    conf = base / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=dinotest", f"SlurmctldHost={host}",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={socket_path}",
        "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={base / 'ctld'}", f"SlurmdSpoolDir={base / 'd'}",
        f"SlurmctldPidFile={base / 'run' / 'slurmctld.pid'}", f"SlurmdPidFile={base / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={base / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={base / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
        "SlurmdParameters=config_overrides", "ReturnToService=2", "MpiDefault=none", "MinJobAge=600",
        "SchedulerParameters=sched_interval=1", "GresTypes=gpu",
        f"NodeName={host} CPUs=16 RealMemory=512000 Gres=gpu:4 State=UNKNOWN",
        f"PartitionName={CPU_QUEUE} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        f"PartitionName={GPU_QUEUE} Nodes=ALL MaxTime=INFINITE State=UP", ""]))
    (base / "gres.conf").write_text(f"NodeName={host} Name=gpu File={','.join(gpus)}\n")
    # The jobstep plugin drops SLURM_* (SLURM_CONF too) before its nested srun; a real cluster
    # has /etc/slurm/slurm.conf, this one only SLURM_CONF, so srun gets it from a wrapper.
    srun = base / "bin" / "srun"
    srun.write_text(f"#!/bin/sh\nSLURM_CONF={conf} exec {_which('srun')} \"$@\"\n")
    srun.chmod(0o755)
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{base / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    pidfiles = [base / "run" / n for n in ("slurmd.pid", "slurmctld.pid", "munged.pid")]
    try:
        subprocess.run([_which("munged"), "--force", f"--socket={socket_path}", f"--key-file={key}",
                        f"--pid-file={pidfiles[2]}", f"--log-file={base / 'log' / 'munged.log'}",
                        f"--seed-file={base / 'run' / 'munge.seed'}"], check=True, env=env)
        subprocess.run([_which("slurmctld"), "-f", str(conf)], check=True, env=env)
        subprocess.run([_which("slurmd"), "-f", str(conf)], check=True, env=env)
        for _ in range(60):
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout.split()
            if state and all(s == "idle" for s in state):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"one-node SLURM did not come up (sinfo: {state}); logs in {base / 'log'}")
        yield {"env": env, "base": base}
    finally:
        subprocess.run(["scancel", "--user", getpass.getuser()], env=env, capture_output=True)
        for pidfile in pidfiles:  # only the daemons started here
            if pidfile.exists():
                try:
                    os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


def slurm_minutes(limit: str) -> int:
    """SLURM's [days-]hours:minutes:seconds as minutes."""
    days, _, clock = limit.rpartition("-")
    h, m, sec = (int(x) for x in clock.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + (sec > 0)


def slurm_jobs(env: dict) -> list[dict]:
    """Every job the cluster knows, as `scontrol show job -o` key=value dicts."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, env=env, check=True).stdout
    return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# the whole workflow through the real plugins: local reference, LSF and SLURM at the same time


def _in_thread(results: dict, key: str, function, *args) -> threading.Thread:
    """Run function(*args) in a thread; results[key] gets its value or the exception raised."""
    def target():
        try:
            results[key] = function(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the test that needs it
            results[key] = err
    thread = threading.Thread(target=target, name=key)
    thread.start()
    return thread


def run_lsf(base: Path) -> dict:
    """The tiny workflow through profiles/lsf on the emulated LSF.

    The emulator kills targets of predict_0 for memory while it asks for less than 40 GB
    (attempt 1: 32 GB) and suspends features of predict_0 (SSUSP) until bjobs has shown it.
    """
    directory = base / "cluster"
    write_project(directory, tiny_config())
    state = lsf.configure(
        base / "lsf", max_running=4, queues={CPU_QUEUE: {}, GPU_QUEUE: {"gpus": 4}},
        faults=[{"job_name": OOM_JOB, "memlimit_mb": 40000},
                {"job_name": SUSPENDED_JOB, "suspend": {"state": "SSUSP", "after": 1, "seconds": 2}}],
    )
    bin_dir = lsf.install(base / "bin", python=sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LSF_EMULATOR_DIR": str(state),
           "HF_HOME": str(base / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    try:
        proc = cluster_snakemake(directory, profile_copy("lsf", base), env=env)
    finally:
        lsf.kill_all(state)
    return {"dir": directory, "state": state, "jobs": lsf.all_jobs(state), "log": proc.stdout + proc.stderr}


def slurm_site_per_run() -> list[str]:
    """docs/cluster.md's per-run SLURM site settings (--default-resources ... --set-resources ...)."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    (inline,) = re.findall(r"`(--default-resources slurm_account=[^`]+)`", text)
    return shlex.split(inline)


def run_slurm(cluster: dict, base: Path) -> dict:
    """Features, targets and the grouped metadata of one volume through profiles/slurm as it
    is in the repository (placeholders and all), with the site given per run as the docs show."""
    directory = base / "slurm"
    write_project(directory, tiny_config())
    profile = base / "profile-slurm-as-shipped"
    profile.mkdir()
    shutil.copy(ROOT / "profiles" / "slurm" / "config.yaml", profile / "config.yaml")
    env = {**cluster["env"], "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cluster_snakemake(directory, profile, "results/metadata/predict_0.json", *slurm_site_per_run(),
                      "--slurm-status-command", "squeue",  # no accounting database on this cluster
                      "--slurm-init-seconds-before-status-checks", "1", env=env)
    return {"dir": directory, "jobs": [j for j in slurm_jobs(env) if j.get("WorkDir") == str(directory)]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request) -> dict:
    """The tiny workflow locally (the reference), through profiles/lsf, and where SLURM is
    installed partly through profiles/slurm: all at once, as the cluster runs mostly wait."""
    base = tmp_path_factory.mktemp("runs")
    write_project(base / "local", tiny_config())
    results: dict = {}
    threads = [_in_thread(results, "local", snakemake, base / "local")]
    try:
        cluster = request.getfixturevalue("slurm_cluster")
    except pytest.skip.Exception as skipped:
        results["slurm"] = skipped
    else:
        threads.append(_in_thread(results, "slurm", run_slurm, cluster, base))
    try:
        results["lsf"] = run_lsf(base)
    finally:
        for thread in threads:
            thread.join()
    if isinstance(results["local"], BaseException):
        raise results["local"]
    results["local"] = base / "local"
    return results


@pytest.fixture(scope="module")
def lsf_run(runs) -> dict:
    return {**runs["lsf"], "local": runs["local"]}


@pytest.mark.slow
@pytest.mark.workflow
def test_lsf_jobs_are_submitted_with_their_rules_resources(lsf_run):
    jobs = lsf_run["jobs"]
    submitted = {rule_of(j["name"]) for j in jobs}
    assert set(EXPECTED) <= submitted, f"never submitted: {set(EXPECTED) - submitted}"
    assert not submitted & LOCAL_RULES, "local rules must not go to LSF"
    for job in jobs:
        rule, attempt = rule_of(job["name"]), attempt_of(job["command"])
        opts = job["options"]
        assert opts["-P"] == PROJECT and opts["-env"] == "all" and "span[hosts=1]" in job["requirements"]
        assert job["output"].startswith(str(lsf_run["dir"] / ".snakemake" / "lsf_logs"))
        if rule not in EXPECTED:  # a rule the profile does not size: CPU queue, its own resources
            assert job["queue"] == CPU_QUEUE and job["gpus"] is None, job["name"]
            assert job["runlimit_min"] and job["mem_total_mb"], job["name"]
            continue
        queue, gpus, walltime, slots, mem_mb = EXPECTED[rule]
        got = (job["queue"], job["gpus"] or 0, job["runlimit_min"], job["slots"], job["mem_total_mb"])
        assert got == (queue, gpus, walltime, slots, mem_mb * attempt), f"{job['name']} (attempt {attempt}): {got}"
        assert job["rusage_mem"] == mem_mb * attempt / slots  # the plugin reserves memory per slot
        if gpus:
            assert opts["-gpu"] == "num=1"
    # the project is given, so the plugin never guesses it from bhist; queues never from lsb.params
    assert not lsf.commands(lsf_run["state"], "bhist")
    assert lsf.commands(lsf_run["state"], "badmin") == [["badmin", "showconf", "mbd"]]


@pytest.mark.slow
@pytest.mark.workflow
def test_lsf_run_completes_with_the_outputs_of_a_local_run(lsf_run):
    assert "Nothing to be done" in snakemake(lsf_run["dir"], "-n").stdout
    assert_same_results(lsf_run["dir"], lsf_run["local"])
    assert not list(lsf_run["dir"].rglob(".*.tmp-*")), "temporary outputs were left behind"


@pytest.mark.slow
@pytest.mark.workflow
def test_lsf_job_killed_for_memory_is_resubmitted_with_more_memory(lsf_run):
    tries = [j for j in lsf_run["jobs"] if OOM_JOB in j["name"]]
    assert [(attempt_of(j["command"]), j["stat"], j["mem_total_mb"]) for j in tries] == [
        (1, "EXIT", 32000), (2, "DONE", 64000)]
    assert tries[0]["term"].startswith("TERM_MEMLIMIT") and tries[0]["exit_code"] == lsf.MEMLIMIT_EXIT
    assert "TERM_MEMLIMIT" in Path(tries[0]["output"]).read_text()  # what the user finds in the LSF log
    # Snakemake's error for the killed job points at that LSF log (docs/cluster.md, "Watch")
    error = re.search(r"Error in rule targets:.*?(?=\n\S|\Z)", lsf_run["log"], re.S)
    assert error and f"LSF-job '{tries[0]['jobid']}' failed" in error.group(0), lsf_run["log"][-3000:]
    assert re.search(r"log: logs/targets/predict_0\.log, \S*/\.snakemake/lsf_logs/rule_targets/volume=predict_0/",
                     error.group(0)), error.group(0)
    assert (lsf_run["dir"] / "results" / "targets" / "predict_0.zarr").is_dir()
    assert sum(OOM_JOB in j["name"] for j in lsf_run["jobs"]) == 2


@pytest.mark.slow
@pytest.mark.workflow
def test_lsf_suspended_job_is_not_counted_as_failed(lsf_run):
    (job,) = [j for j in lsf_run["jobs"] if SUSPENDED_JOB in j["name"]]  # submitted once: no retry
    assert "SSUSP" in job["reported"], "bjobs never showed the suspension to the plugin"
    assert [h[1] for h in job["history"]][-3:] == ["SSUSP", "RUN", "DONE"]
    assert f"LSF-job '{job['jobid']}' failed" not in lsf_run["log"]


@pytest.mark.slow
@pytest.mark.workflow
def test_lsf_jobs_get_the_submit_environment_for_offline_weights(lsf_run):
    for job in lsf_run["jobs"]:
        assert job["env"]["HF_HUB_OFFLINE"] == "1" and job["env"]["HF_HOME"].endswith("hf"), job["name"]


@pytest.mark.slow
@pytest.mark.workflow
def test_slurm_profile_on_a_one_node_cluster(runs):
    """Every sbatch as the rule should get it, and the same features and targets as locally."""
    if isinstance(runs["slurm"], pytest.skip.Exception):
        pytest.skip(runs["slurm"].msg)
    if isinstance(runs["slurm"], BaseException):
        raise runs["slurm"]
    jobs = {j["Comment"].split("_wildcards_")[0].removeprefix("rule_"): j for j in runs["slurm"]["jobs"]}
    assert set(jobs) == {"demo_data", "features", "targets", "bookkeeping_metadata"}
    jobs["bookkeeping"] = jobs.pop("bookkeeping_metadata")
    for rule, job in jobs.items():
        queue, gpus, walltime, slots, mem_mb = EXPECTED[rule]
        if rule == "bookkeeping":  # one volume: one metadata job in the group
            slots, mem_mb = 1, mem_mb // 4
        got = (job["Partition"], bool(re.search(r"gpu:1$", job.get("TresPerJob", ""))), slurm_minutes(job["TimeLimit"]),
               int(job["NumCPUs"]), job["MinMemoryNode"], job["Account"], job["JobState"])
        want = (queue, bool(gpus), walltime, slots, f"{mem_mb}M", SLURM_ACCOUNT, "COMPLETED")
        assert got == want, rule
    for rel in ("features/predict_0.zarr", "targets/predict_0.zarr"):
        assert_same_results(runs["slurm"]["dir"], runs["local"], only=rel)

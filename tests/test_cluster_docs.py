"""Every `snakemake --profile profiles/lsf ...` command shown in docs/cluster.md, run against the
emulated LSF through the real plugin, with each submitted job's bsub line checked: queue,
`-gpu`, total memory by attempt, `-W` and slots, as the rules declare them plus what the
command overrides. This is what issue "cluster overrides that keep per-rule settings" asked:
a per-run `--set-resources` or `--default-resources` never drops a rule's GPU request, memory
or walltime.

The whole-workflow launch (`snakemake --profile profiles/lsf --workflow-profile none`) is
run by tests/test_cluster.py (with a memory kill and a suspension); the per-run site
command runs the whole workflow again here; the rerun commands run on a copy of the
finished tiny project (tests/conftest.py) with the outputs they name removed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import threading
from pathlib import Path

import pytest

from lsf_emulator import lsf
from test_cluster import (
    CPU_QUEUE, EXPECTED, GPU_QUEUE, LOCAL_RULES, PROJECT, attempt_of, cluster_snakemake, profile_copy, rule_of,
)
from test_workflow import ROOT, jobs_in, tiny_config, write_project

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

DOCS = ROOT / "docs" / "cluster.md"
LAUNCH = "snakemake --profile profiles/lsf --workflow-profile none"
DOC_VOLUME, TEST_VOLUME = "vol_003", "predict_0"


def documented_commands(path: Path, prefix: str = LAUNCH) -> list[str]:
    """The commands starting with ``prefix`` in the bash blocks of a Markdown file, with
    continuation lines joined and trailing comments removed."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = " ".join(re.sub(r"\s+#.*$", "", line).split())
            if line.startswith(prefix):
                commands.append(line)
    return commands


def overrides(args: list[str]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(--default-resources, --set-resources) of a command line as dicts."""
    default: dict[str, str] = {}
    per_rule: dict[str, dict[str, str]] = {}
    option = None
    for arg in args:
        if arg.startswith("--"):
            option = arg
        elif option == "--default-resources":
            key, value = arg.split("=", 1)
            default[key] = value
        elif option == "--set-resources":
            rule_key, value = arg.split("=", 1)
            rule, key = rule_key.split(":")
            per_rule.setdefault(rule, {})[key] = value
    return default, per_rule


def _minutes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([mhd]?)", value).groups()
    return int(number) * {"": 1, "m": 1, "h": 60, "d": 1440}[unit]


def expected_jobs(args: list[str], metadata_jobs: int) -> dict[str, tuple]:
    """EXPECTED (what the rules declare, with the queues the tests substitute) with the
    command's overrides applied; a bookkeeping group of ``metadata_jobs`` (< 4) metadata
    jobs asks for that many slots and times the memory."""
    default, per_rule = overrides(args)
    expected = {}
    for rule, (queue, gpus, walltime, slots, mem_mb) in EXPECTED.items():
        if queue == CPU_QUEUE and "lsf_queue" in default:
            queue = default["lsf_queue"]
        own = per_rule.get(rule, {})
        queue = own.get("lsf_queue", queue)
        mem_mb = int(own.get("mem_mb", mem_mb))
        walltime = _minutes(own["runtime"]) if "runtime" in own else walltime
        if rule == "bookkeeping" and metadata_jobs < slots:
            slots, mem_mb = metadata_jobs, mem_mb // slots * metadata_jobs
        expected[rule] = (queue, gpus, walltime, slots, mem_mb)
    return expected


def check_bsub_lines(jobs: list[dict], args: list[str], metadata_jobs: int = 4) -> set[str]:
    """Every submitted job as its rule (plus the command's overrides) should be; returns the
    rules submitted."""
    expected = expected_jobs(args, metadata_jobs)
    default, _ = overrides(args)
    submitted = {rule_of(j["name"]) for j in jobs}
    assert not submitted & LOCAL_RULES, "local rules must not go to LSF"
    for job in jobs:
        rule, attempt = rule_of(job["name"]), attempt_of(job["command"])
        assert job["options"]["-P"] == default.get("lsf_project", PROJECT), job["name"]
        if rule not in expected:  # report_slices: CPU queue, its rule's own resources
            assert job["queue"] == expected["targets"][0] and job["gpus"] is None, job["name"]
            assert job["runlimit_min"] and job["mem_total_mb"], job["name"]
            continue
        queue, gpus, walltime, slots, mem_mb = expected[rule]
        got = (job["queue"], job["gpus"] or 0, job["runlimit_min"], job["slots"], job["mem_total_mb"])
        assert got == (queue, gpus, walltime, slots, mem_mb * attempt), f"{job['name']}: {got}"
        if gpus:
            assert job["options"]["-gpu"] == "num=1", job["name"]
    return submitted


def _prepare(command: str, base: Path, finished: Path) -> tuple[Path, Path, list[str], str]:
    """(project directory, profile, snakemake arguments, kind) for one documented command."""
    args = shlex.split(command.replace(DOC_VOLUME, TEST_VOLUME))[1:]
    site_per_run = "--default-resources" in args
    if site_per_run:  # the profile as it is in the repository, placeholders and all
        profile = base / "profile-as-shipped"
        profile.mkdir()
        shutil.copy(ROOT / "profiles" / "lsf" / "config.yaml", profile / "config.yaml")
    else:
        profile = profile_copy("lsf", base)
    i = args.index("--profile")
    rest = args[:i] + args[i + 2:]
    targets = [a for a in rest if a.startswith("results/")]
    if site_per_run:  # the whole workflow from scratch
        directory = base / "project"
        write_project(directory, tiny_config())
        return directory, profile, rest, "site per run"
    directory = base / "project"
    shutil.copytree(finished, directory, symlinks=True)
    forced = "--force" in rest or "--forcerun" in rest
    if not targets:  # a per-rule resource change for one run: redo that rule's jobs
        rule = next(iter(overrides(rest)[1]))
        shutil.rmtree(directory / "results" / {"segment": "segmentations"}[rule] / f"{TEST_VOLUME}.zarr")
        return directory, profile, rest, f"{rule} resources"
    if not forced:  # rerun a failed volume: its outputs are missing
        for target in targets:
            path = directory / target
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            if target.startswith("results/metadata/"):  # "and its targets"
                shutil.rmtree(directory / "results" / "targets" / f"{TEST_VOLUME}.zarr")
    return directory, profile, rest, "rerun"


def _run(command: str, base: Path, finished: Path) -> dict:
    directory, profile, args, kind = _prepare(command, base, finished)
    state = lsf.configure(base / "lsf", max_running=4, queues={CPU_QUEUE: {}, GPU_QUEUE: {"gpus": 4}})
    bin_dir = lsf.install(base / "bin", python=sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LSF_EMULATOR_DIR": str(state),
           "HF_HOME": str(base / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    args = [a for a in args if a not in ("--workflow-profile", "none")]  # cluster_snakemake adds them
    try:
        proc = cluster_snakemake(directory, profile, *args, env=env, timeout=1200)
    finally:
        lsf.kill_all(state)
    return {"kind": kind, "args": args, "dir": directory, "jobs": lsf.all_jobs(state),
            "out": proc.stdout + proc.stderr}


COMMANDS = documented_commands(DOCS)


def test_the_docs_show_the_commands_run_here():
    assert LAUNCH in COMMANDS and f"{LAUNCH} -n" in COMMANDS
    assert any("--default-resources" in c for c in COMMANDS), "the per-run site command is gone from the docs"
    assert any("--forcerun" in c for c in COMMANDS), "the in-place change command is gone from the docs"
    assert len(COMMANDS) >= 9


@pytest.fixture(scope="module")
def doc_runs(project, tmp_path_factory) -> dict[str, dict | BaseException]:
    """Each documented command but the plain launch and the dry run, all at once (they
    mostly wait on the emulator)."""
    results: dict[str, dict | BaseException] = {}
    todo = [c for c in COMMANDS if c not in (LAUNCH, f"{LAUNCH} -n")]

    def run(command: str, base: Path) -> None:
        try:
            results[command] = _run(command, base, project)
        except BaseException as err:  # noqa: BLE001 - reported by the test of that command
            results[command] = err

    threads = [threading.Thread(target=run, args=(c, tmp_path_factory.mktemp("doc"))) for c in todo]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in (LAUNCH, f"{LAUNCH} -n")])
def test_documented_command_submits_every_job_with_its_rules_resources(doc_runs, command):
    result = doc_runs[command]
    if isinstance(result, BaseException):
        raise result
    submitted = check_bsub_lines(result["jobs"], result["args"], 4 if result["kind"] == "site per run" else 1)
    if result["kind"] != "rerun":  # the command brought the workflow up to date
        assert "Nothing to be done" in cluster_dry_run(result["dir"])
    if result["kind"] == "site per run":  # every rule went to LSF with its own resources
        assert set(EXPECTED) <= submitted, f"never submitted: {set(EXPECTED) - submitted}"
    elif result["kind"] == "segment resources":
        assert "segment" in submitted and not submitted & {"features", "targets", "train", "predict"}
    elif "--forcerun" in result["args"]:  # one volume and everything downstream of it
        # predict_0 is a predicted volume: its prediction is downstream, the model is not
        assert {"features", "targets", "bookkeeping", "predict", "segment", "evaluate"} <= submitted
        assert "train" not in submitted
        names = [j["name"] for j in result["jobs"] if rule_of(j["name"]) in ("features", "targets")]
        assert names and all(f"volume={TEST_VOLUME}" in n for n in names), names
    else:  # a rerun of what one volume lacks
        assert submitted and submitted <= {"features", "targets", "bookkeeping"}, submitted
        assert all(f"volume={TEST_VOLUME}" in j["name"] or "group" in j["name"] for j in result["jobs"])


def cluster_dry_run(directory: Path) -> str:
    from test_workflow import snakemake

    return snakemake(directory, "-n").stdout


def test_documented_dry_run_submits_nothing(tmp_path):
    directory = tmp_path / "project"
    write_project(directory, tiny_config())
    state = lsf.configure(tmp_path / "lsf", max_running=4, queues={CPU_QUEUE: {}, GPU_QUEUE: {"gpus": 4}})
    bin_dir = lsf.install(tmp_path / "bin", python=sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LSF_EMULATOR_DIR": str(state)}
    proc = cluster_snakemake(directory, profile_copy("lsf", tmp_path), "-n", env=env)
    jobs = jobs_in(proc.stdout + proc.stderr)
    assert jobs["features"] == 4 and jobs["train"] == 1
    assert not lsf.all_jobs(state)

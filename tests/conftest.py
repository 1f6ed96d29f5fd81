"""Shared fixtures: paths to the real test data and tiny workflow configurations."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip when a fresh clone does not have it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not present at {SHARED_DATA} (only CI and developers have ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """The tiny demo workflow run once to the end with real Snakemake (shared by the
    workflow tests; they read it, or rerun jobs whose outputs are deterministic)."""
    from test_workflow import snakemake, tiny_config, write_project

    import os, shutil
    if os.environ.get("REUSE_PROJECT"):
        directory = tmp_path_factory.mktemp("project")
        shutil.rmtree(directory); shutil.copytree(os.environ["REUSE_PROJECT"], directory, symlinks=True)
        return directory
    directory = tmp_path_factory.mktemp("project")
    write_project(directory, tiny_config())
    snakemake(directory)
    return directory

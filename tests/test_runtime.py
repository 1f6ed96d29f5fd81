"""dinopipe.runtime: one vocabulary for devices and mixed precision, memory trimming."""

from __future__ import annotations

import pytest
import torch

from dinopipe.runtime import (
    AUTOCAST,
    autocast_context,
    autocast_mode,
    compute_precision,
    is_device_name,
    release_freed_memory,
    resident_mb,
    resolve_device,
)


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_every_stage_accepts(name):
    assert is_device_name(name)


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "mps", "", None, 0])
def test_unknown_device_names_are_refused_naming_the_key(name):
    assert not is_device_name(name)
    with pytest.raises(ValueError, match=r"train\.device is .*allowed: 'auto'"):
        resolve_device(name, "train.device")


def test_resolve_device_on_a_machine_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"predict\.device is 'cuda:1' but CUDA is not available"):
        resolve_device("cuda:1", "predict.device")


def test_autocast_modes_and_the_older_booleans():
    assert AUTOCAST == ("bf16", "fp16", "none")
    assert [autocast_mode(m) for m in (*AUTOCAST, True, False)] == ["bf16", "fp16", "none", "bf16", "none"]
    with pytest.raises(ValueError, match=r"features\.autocast is 'fp8'"):
        autocast_mode("fp8", "features.autocast")


def test_autocast_is_a_no_op_on_cpu():
    x = torch.ones(2, 2)
    for mode in (*AUTOCAST, True):
        with autocast_context(torch.device("cpu"), mode):
            assert (x @ x).dtype == torch.float32


def test_the_precision_recorded_is_the_one_computed_in():
    """CPU always computes in float32, whatever the mode; CUDA in the autocast mode's dtype."""
    assert [compute_precision(torch.device("cpu"), m) for m in (*AUTOCAST, True)] == ["fp32"] * 4
    cuda = torch.device("cuda:0")  # a device object only: nothing runs on it
    assert [compute_precision(cuda, m) for m in (*AUTOCAST, True, False)] == ["bf16", "fp16", "fp32", "bf16", "fp32"]


def test_every_stage_refuses_the_same_bad_names():
    """features, train and predict share the one vocabulary (dinopipe.runtime)."""
    from dinopipe.backbone import load_backbone
    from dinopipe.checks import check_config
    from dinopipe.features import FeatureParams
    from dinopipe.train_params import resolve_train_params

    with pytest.raises(ValueError, match=r"features\.device is 'gpu'"):
        load_backbone("tiny-vit", device="gpu")
    with pytest.raises(ValueError, match=r"train\.device is 'gpu'"):
        resolve_train_params({"device": "gpu"})
    with pytest.raises(ValueError, match=r"features\.autocast is 'fp8'"):
        FeatureParams(autocast="fp8").validate()
    problems = check_config({"predict": {"device": "gpu"}})
    assert any(p.startswith("predict.device is 'gpu'") for p in problems)


def test_release_freed_memory_runs():
    release_freed_memory()  # glibc malloc_trim here; a no-op elsewhere — must not raise


def test_resident_mb_sees_a_held_array():
    import numpy as np

    before = resident_mb()
    held = np.ones(64 * 2**20 // 8)  # 64 MB, touched
    after = resident_mb()
    assert held[-1] == 1.0
    assert after - before > 50, (before, after)


def test_one_job_gc_raises_the_thresholds_once_and_freezes_what_lives_at_exit():
    """In a fresh process (it changes the process's collector): thresholds raised, one exit
    hook however often it is called, and at exit the live objects are frozen."""
    import subprocess
    import sys

    code = (
        "import atexit, gc\n"
        "from dinopipe.runtime import JOB_GC_THRESHOLDS, one_job_gc\n"
        "before = atexit._ncallbacks()\n"
        "one_job_gc(); one_job_gc()\n"
        "assert gc.get_threshold() == JOB_GC_THRESHOLDS, gc.get_threshold()\n"
        "assert atexit._ncallbacks() == before + 1\n"
        "assert gc.get_freeze_count() == 0\n"
        "atexit._run_exitfuncs()\n"
        "print(gc.get_freeze_count() > 1000)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_peak_resident_mb_is_the_process_own_peak_not_that_of_its_parent():
    """getrusage's ru_maxrss of a process started by a large one reports the large one's peak;
    VmHWM does not."""
    import subprocess
    import sys

    import numpy as np

    held = np.ones(256 * 2**20 // 8)  # 256 MB touched here, in the parent
    code = "from dinopipe.runtime import peak_resident_mb; print(peak_resident_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 0 < float(out.stdout) < 128 < resident_mb() - 200
    del held

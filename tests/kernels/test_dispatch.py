"""choose_backend: device rules, env override, logging once; importing mmkit.kernels stays light."""

import logging
import subprocess
import sys

import pytest
import torch

from mmkit.kernels import dispatch


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("MMKIT_KERNEL_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    dispatch._logged.clear()


def test_cpu_tensor_uses_torch_and_logs_once(caplog):
    with caplog.at_level(logging.INFO, logger="mmkit.kernels.dispatch"):
        assert dispatch.choose_backend(torch.zeros(1), "op_a") == "torch"
        assert dispatch.choose_backend(torch.zeros(1), "op_a") == "torch"
        assert dispatch.choose_backend(torch.zeros(1), "op_b") == "torch"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("op_a" in m for m in messages) == 1 and sum("op_b" in m for m in messages) == 1


def test_interpreter_allows_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    expected = "triton" if dispatch.triton_available() else "torch"
    assert dispatch.choose_backend(torch.zeros(1), "op") == expected


def test_env_override(monkeypatch):
    monkeypatch.setenv("MMKIT_KERNEL_BACKEND", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.choose_backend(torch.zeros(1), "op") == "torch"
    monkeypatch.setenv("MMKIT_KERNEL_BACKEND", "Triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="cannot use Triton on a cpu tensor"):
        dispatch.choose_backend(torch.zeros(1), "op")
    monkeypatch.setenv("MMKIT_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="not valid"):
        dispatch.choose_backend(torch.zeros(1), "op")


def test_import_is_light():
    code = ("import sys, mmkit.kernels; "
            "assert 'triton' not in sys.modules, 'triton imported eagerly'; "
            "import torch; assert not torch.cuda.is_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

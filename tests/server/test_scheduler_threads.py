"""The scheduler process leaves a CPU core to the main process and the detokenizer, which
pass every token on while the next step computes (see scheduler_process.leave_a_core)."""
import pytest
import torch

from server.managers.scheduler_process import leave_a_core

pytestmark = pytest.mark.server


def test_scheduler_leaves_one_core_on_cpu_only(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(4)
        leave_a_core(torch.device("cuda"))       # the model runs on the GPU: nothing to make room for
        assert torch.get_num_threads() == 4
        leave_a_core(torch.device("cpu"))
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "3")   # the operator's explicit choice is kept
        leave_a_core(torch.device("cpu"))
        assert torch.get_num_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        torch.set_num_threads(1)
        leave_a_core(torch.device("cpu"))        # never below one thread
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

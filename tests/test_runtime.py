"""InferenceSession: CPU runs, provider selection (checked, never assumed), the guarded CUDA path."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from automtl_compiler import build_supermodel
from automtl_compiler import runtime as rt
from automtl_compiler.backends.onnx_export import export_onnx
from automtl_compiler.errors import AutomtlError, FileFormatError
from automtl_compiler.nn.compact import prune
from automtl_compiler.nn.heads import ASPPHead, ClassificationHead
from automtl_compiler.runtime import InferenceSession, benchmark, select_providers

CUDA_USABLE = rt.cuda_status()[0]
ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture(scope="module")
def model_and_path(tmp_path_factory):
    torch.manual_seed(0)
    heads = {"seg": ASPPHead(512, 2, hidden=8), "cls": ClassificationHead(512, 3)}
    sm = build_supermodel("torchvision:resnet18", heads, input_shape=(1, 3, 32, 32)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sm.policy_parameters():
            p.copy_(torch.randn(3, generator=gen))
    model = prune(sm, sm.sample_policy("sample", seed=0)).eval()
    path = tmp_path_factory.mktemp("rt") / "model.onnx"
    export_onnx(model, path)
    return model, path


class Spy:
    """Stands in for ort.InferenceSession: records the providers asked for, opens a real CPU session."""

    real = ort.InferenceSession

    def __init__(self) -> None:
        self.requested: list = []

    def __call__(self, path, opts=None, providers=None, **kw):  # type: ignore[no-untyped-def]
        self.requested.append(list(providers or []))
        return self.real(path, opts, providers=["CPUExecutionProvider"], **kw)


@pytest.fixture
def spy(monkeypatch):
    s = Spy()
    monkeypatch.setattr(ort, "InferenceSession", s)
    return s


def test_cpu_session_runs_every_task(model_and_path):
    model, path = model_and_path
    session = InferenceSession(path, provider="cpu", threads=1)
    assert session.providers == ["CPUExecutionProvider"] and session.device == "cpu"
    assert session.tasks == ["seg", "cls"] and session.input_shape == ["batch", 3, 32, 32]
    assert session.metadata["tasks"] == ["seg", "cls"]
    assert session.metadata["policy"]["choices"] == model.policy.choices
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    for got in (session.run(x), session.run(x.numpy()), session(x.double().numpy())):
        assert sorted(got) == ["cls", "seg"]
        for task in model.tasks:
            assert isinstance(got[task], np.ndarray)
            np.testing.assert_allclose(got[task], want[task].numpy(), atol=1e-4, rtol=1e-4)


def test_auto_without_gpu_never_requests_cuda(model_and_path, spy, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(ALL))
    monkeypatch.setattr(rt, "cuda_device_present", lambda: (False, "no CUDA GPU is visible"))
    session = InferenceSession(model_and_path[1])
    assert spy.requested == [["CPUExecutionProvider"]]
    assert session.providers == ["CPUExecutionProvider"]
    assert select_providers("auto") == ["CPUExecutionProvider"]


def test_cuda_without_gpu_is_a_clear_error(model_and_path, spy, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(ALL))
    monkeypatch.setattr(rt, "cuda_device_present", lambda: (False, "no CUDA GPU is visible"))
    with pytest.raises(AutomtlError, match="CUDA provider is not usable: no CUDA GPU is visible.*onnxruntime-gpu"):
        InferenceSession(model_and_path[1], provider="cuda")
    assert spy.requested == []


def test_onnxruntime_without_cuda_provider(model_and_path, spy, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(rt, "cuda_device_present", lambda: pytest.fail("no GPU check needed"))
    with pytest.raises(AutomtlError, match="has no CUDAExecutionProvider"):
        InferenceSession(model_and_path[1], provider="cuda")
    InferenceSession(model_and_path[1], provider="auto")
    assert spy.requested == [["CPUExecutionProvider"]]


def test_gpu_present_requests_cuda_first(model_and_path, spy, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(ALL))
    monkeypatch.setattr(rt, "cuda_device_present", lambda: (True, ""))
    InferenceSession(model_and_path[1], provider="auto")
    assert spy.requested == [[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]]
    # the spy opened a CPU session: onnxruntime did not start CUDA, which provider="cuda" must not accept
    with pytest.raises(AutomtlError, match="could not start the CUDA provider"):
        InferenceSession(model_and_path[1], provider="cuda")


def test_cpu_provider_never_checks_for_a_gpu(model_and_path, monkeypatch):
    monkeypatch.setattr(rt, "cuda_status", lambda: pytest.fail("provider='cpu' must not look for CUDA"))
    assert InferenceSession(model_and_path[1], provider="cpu").providers == ["CPUExecutionProvider"]


def test_this_machine_reports_a_reason_when_cuda_is_unusable():
    usable, reason = rt.cuda_status()
    assert usable or reason


@pytest.mark.skipif(CUDA_USABLE, reason="a usable GPU is present")
def test_real_cuda_request_fails_cleanly_without_gpu(model_and_path):
    with pytest.raises(AutomtlError, match="not usable"):
        InferenceSession(model_and_path[1], provider="cuda")
    assert InferenceSession(model_and_path[1]).providers == ["CPUExecutionProvider"]


@pytest.mark.skipif(not CUDA_USABLE, reason="needs a CUDA GPU and onnxruntime-gpu")
def test_cuda_session_matches_cpu(model_and_path):
    _, path = model_and_path
    gpu = InferenceSession(path, provider="cuda")
    assert gpu.providers[0] == "CUDAExecutionProvider" and gpu.device == "cuda"
    assert InferenceSession(path).providers[0] == "CUDAExecutionProvider"  # auto picks it
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    cpu = InferenceSession(path, provider="cpu").run(x)
    for task, value in gpu.run(x).items():
        np.testing.assert_allclose(value, cpu[task], atol=1e-3, rtol=1e-3)


def test_errors(model_and_path, tmp_path):
    _, path = model_and_path
    with pytest.raises(AutomtlError, match="unknown provider 'tpu'"):
        InferenceSession(path, provider="tpu")
    with pytest.raises(FileFormatError, match="not found"):
        InferenceSession(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(FileFormatError, match="cannot load"):
        InferenceSession(tmp_path / "junk.onnx", provider="cpu")
    session = InferenceSession(path, provider="cpu")
    with pytest.raises(AutomtlError, match="axis 1 is fixed at 3"):
        session.run(np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(AutomtlError, match="takes"):
        session.run(np.zeros((3, 32, 32), np.float32))


def test_benchmark_rows(model_and_path):
    rows = benchmark(model_and_path[1], batch=2, providers=["cpu"], repeat=2, warmup=1, threads=1)
    assert len(rows) == 1
    row = rows[0]
    assert row["provider"] == "cpu" and row["batch"] == 2 and row["input_shape"] == [2, 3, 32, 32]
    assert row["median_ms"] > 0 and row["images_per_s"] == pytest.approx(2000 / row["median_ms"])

"""The one backend registry: explicit argument > ATTNPROBE_BACKEND > auto; capability checks."""
import pytest
import torch

from attnprobe.core import backends


@pytest.fixture
def toy_op():
    name = "toy-op"
    backends.register(name, "reference")(lambda x: "reference")
    backends.register(name, "triton", usable=lambda x: x.dtype == torch.float32)(lambda x: "triton")
    yield name
    backends._OPS.pop(name, None)


def test_choice_order(toy_op, monkeypatch):
    x = torch.zeros(2)  # a CPU tensor: auto never picks a GPU kernel for it
    monkeypatch.delenv(backends.ENV, raising=False)
    monkeypatch.delenv("DELTADISTILL_BACKEND", raising=False)
    assert backends.resolve(toy_op, x) == "reference"
    assert backends.call(toy_op, x, backend="triton") == "triton"  # explicit wins
    monkeypatch.setenv(backends.ENV, "triton")
    assert backends.resolve(toy_op, x) == "triton"  # the environment variable, when no argument
    assert backends.resolve(toy_op, x, "reference") == "reference"  # ... but the argument wins
    with pytest.raises(RuntimeError, match="cannot run"):  # the capability check
        backends.resolve(toy_op, x.double())
    monkeypatch.setenv(backends.ENV, "fastest")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve(toy_op, x)


def test_old_variable_still_read_with_a_warning(toy_op, monkeypatch):
    monkeypatch.delenv(backends.ENV, raising=False)
    monkeypatch.setenv("DELTADISTILL_BACKEND", "triton")
    with pytest.warns(UserWarning, match="ATTNPROBE_BACKEND"):
        assert backends.resolve(toy_op, torch.zeros(1)) == "triton"


def test_every_op_of_both_packages_has_a_reference():
    import attnprobe.kernels  # noqa: F401
    from deltadistill import ops

    for op in (*ops.OPS, "ring_mass_attention"):
        assert "reference" in backends.implementations(op), op


def test_capture_honours_the_environment(monkeypatch):
    """The ring-mass kernel choice of the capture goes through the registry (no private switch)."""
    from attnprobe import analyze
    from attnprobe.core.registry import load_pipeline

    pipe, _ = load_pipeline("tiny-pixart")
    monkeypatch.setenv(backends.ENV, "triton")
    if backends.triton_importable() and not backends.interpreting():
        with pytest.raises(RuntimeError, match="ring_mass_attention"):  # CPU tensors, no interpreter: refused
            analyze(pipe, ["a photo of cat"], steps=1)
    monkeypatch.setenv(backends.ENV, "reference")
    assert analyze(pipe, ["a photo of cat"], steps=1).layers[0].ring.sum() > 0

"""The mixed-resolution transition: reference vs an independent float64 computation, the fused Triton
kernel vs the reference, the seeded noise, and the custom op (eager, opcheck, fake, torch.export).
triton is part of the test extra: without it these tests fail rather than skip, so CI cannot pass them
silently.

Without a GPU the Triton kernel runs in the interpreter on CPU tensors: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton (triton.jit reads it at decoration time).
"""
import subprocess
import sys

import pytest
import torch

from postdiff_compile.errors import PostDiffError  # noqa: E402
from postdiff_compile.kernels.transition_op import (ensure_registered, kernel_available,  # noqa: E402
                                                    resolution_transition)
from postdiff_compile.kernels.transition_ref import (PREDICTION_TYPES, RENOISE_MODES, TransitionParams,  # noqa: E402
                                                     predict_x0_and_noise, transition_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, h, w, H, W): odd, non-square, 2x and SDXL's non-integer 3/4 ratio (6 -> 8), and a downsample.
SIZES = [(1, 9, 13, 17, 26), (2, 12, 8, 24, 16), (2, 6, 6, 8, 8), (1, 5, 7, 10, 14), (1, 9, 13, 6, 8)]
TOL = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_inputs(B, h, w, H, W, dtype=torch.float32, renoise="fresh", seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, h, w, generator=g).to(device, dtype)
    m = torch.randn(B, 4, h, w, generator=g).to(device, dtype)
    noise = torch.randn(B, 4, H, W, generator=g).to(device, dtype) if renoise == "fresh" else None
    return x, m, noise


def ref32(x, m, size, params, noise=None):
    """The reference in float32 from the same (possibly low-precision) inputs."""
    return transition_reference(x.float(), m.float(), size, params, None if noise is None else noise.float())


# --- the reference against an independent computation ---------------------------------------------------

def bilinear64(img: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Bilinear resize (align_corners=False) by index arithmetic in float64, no F.interpolate."""
    def taps(n_in, n_out):
        src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
        i0 = src.floor().long().clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).clamp(0, 1)

    y0, y1, ly = taps(img.shape[-2], H)
    x0, x1, lx = taps(img.shape[-1], W)
    ly, lx = ly[:, None], lx[None, :]
    rows0, rows1 = img[..., y0, :], img[..., y1, :]
    top = rows0[..., x0] * (1 - lx) + rows0[..., x1] * lx
    bottom = rows1[..., x0] * (1 - lx) + rows1[..., x1] * lx
    return top * (1 - ly) + bottom * ly


def params_for(prediction_type, t=0.35, after=0.62, renoise="fresh", clamp=0.0):
    """Levels for a transition: alpha-bars rise towards the clean end, flow sigmas fall (the same two numbers,
    swapped)."""
    if prediction_type == "flow":
        return TransitionParams.flow(after, t, renoise, clamp)
    return TransitionParams(prediction_type, t, after, renoise, clamp)


@pytest.mark.parametrize("clamp", [0.0, 0.8])
@pytest.mark.parametrize("renoise", RENOISE_MODES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_reference_matches_float64_equations(prediction_type, renoise, clamp):
    B, h, w, H, W = 2, 5, 7, 10, 13
    x, m, noise = make_inputs(B, h, w, H, W, renoise=renoise)
    params = params_for(prediction_type, 0.42, 0.77, renoise, clamp)
    xd, md = x.double(), m.double()
    if prediction_type == "flow":   # x = (1 - s) x0 + s noise, m = noise - x0
        s, sn = 0.77, 0.42
        sa, s1a, san, s1an = 1 - s, s, 1 - sn, sn
        x0 = xd - s * md
    else:
        a, an = 0.42, 0.77
        sa, s1a, san, s1an = a ** 0.5, (1 - a) ** 0.5, an ** 0.5, (1 - an) ** 0.5
        x0 = {"epsilon": (xd - s1a * md) / sa, "v_prediction": sa * xd - s1a * md, "sample": md}[prediction_type]
    eps = (xd - sa * x0) / s1a  # the noise consistent with x0, before any clamp
    if clamp:
        x0 = x0.clamp(-clamp, clamp)
    n = bilinear64(eps, H, W) if renoise == "predicted" else noise.double()
    expected = san * bilinear64(x0, H, W) + s1an * n
    assert rel_err(transition_reference(x, m, (H, W), params, noise), expected) < 1e-6


def test_predict_x0_and_noise_consistent():
    x, m, _ = make_inputs(1, 4, 4, 4, 4)
    for prediction_type in PREDICTION_TYPES:
        params = params_for(prediction_type, 0.3, 0.5)
        x0, eps = predict_x0_and_noise(x, m, params)
        assert x0.dtype == eps.dtype == torch.float32
        a, b, _, _ = params.coefficients()
        torch.testing.assert_close(a * x0 + b * eps, x, rtol=1e-5, atol=1e-5)
        if prediction_type == "flow":   # and the velocity is noise - x0
            torch.testing.assert_close(eps - x0, m, rtol=1e-5, atol=1e-5)


def test_flow_levels_are_checked():
    with pytest.raises(PostDiffError, match="sigma_next"):
        TransitionParams.flow(0.5, 0.6)
    with pytest.raises(PostDiffError, match="sigma_t"):
        TransitionParams.flow(1.2, 0.6)
    assert TransitionParams.flow(1.0, 0.0).coefficients() == (0.0, 1.0, 1.0, 0.0)


def test_identity_when_next_timestep_is_clean():
    # abar_next = 1: the output is the upsampled x0, whatever the noise.
    x, m, noise = make_inputs(1, 4, 6, 8, 12)
    params = TransitionParams("sample", 0.5, 1.0)
    torch.testing.assert_close(transition_reference(x, m, (8, 12), params, noise),
                               torch.nn.functional.interpolate(m, size=(8, 12), mode="bilinear", align_corners=False))


# --- the fused Triton kernel against the reference --------------------------------------------------------

@pytest.mark.parametrize("clamp", [0.0, 1.0])
@pytest.mark.parametrize("renoise", RENOISE_MODES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", SIZES, ids=lambda c: "B{}_{}x{}to{}x{}".format(*c))
def test_kernel_matches_reference(case, dtype, prediction_type, renoise, clamp):
    from postdiff_compile.kernels.transition_triton import transition_triton

    B, h, w, H, W = case
    x, m, noise = make_inputs(*case, dtype=dtype, renoise=renoise, device=DEVICE)
    params = params_for(prediction_type, 0.35, 0.62, renoise, clamp)
    out = transition_triton(x, m, (H, W), params, noise=noise)
    assert out.shape == (B, 4, H, W) and out.dtype == dtype
    assert rel_err(out, ref32(x, m, (H, W), params, noise)) < TOL[dtype]


def test_kernel_takes_non_contiguous_inputs():
    from postdiff_compile.kernels.transition_triton import transition_triton

    x, m, noise = make_inputs(2, 7, 6, 14, 12, device=DEVICE)
    x, m = x.transpose(2, 3), m.transpose(2, 3)  # [2, 4, 6, 7]
    noise = noise.transpose(2, 3)  # [2, 4, 12, 14]
    params = TransitionParams("v_prediction", 0.5, 0.7)
    assert rel_err(transition_triton(x, m, (12, 14), params, noise=noise), ref32(x, m, (12, 14), params, noise)) < 1e-6


def test_int64_indexing_path_gives_the_same_result(monkeypatch):
    # Outputs of 2**31 elements and more index in int64; force that path on a small tensor.
    from postdiff_compile.kernels import transition_triton as tt

    x, m, noise = make_inputs(2, 6, 6, 8, 8, device=DEVICE)
    params = TransitionParams("epsilon", 0.3, 0.6)
    fresh, seeded, z = (tt.transition_triton(x, m, (8, 8), params, noise=noise),
                        tt.transition_triton(x, m, (8, 8), params, seed=5), tt.philox_normal((2, 4, 8, 8), 5, DEVICE))
    monkeypatch.setattr(tt, "_INT32_MAX", 0)
    assert torch.equal(tt.transition_triton(x, m, (8, 8), params, noise=noise), fresh)
    assert torch.equal(tt.transition_triton(x, m, (8, 8), params, seed=5), seeded)
    assert torch.equal(tt.philox_normal((2, 4, 8, 8), 5, DEVICE), z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_seeded_kernel_equals_reference_with_philox_noise(dtype):
    from postdiff_compile.kernels.transition_triton import philox_normal, transition_triton

    x, m, _ = make_inputs(2, 9, 13, 17, 26, dtype=dtype, renoise="predicted", device=DEVICE)
    params = TransitionParams("epsilon", 0.2, 0.5, clamp_x0=2.0)
    out = transition_triton(x, m, (17, 26), params, seed=1234)
    expected = ref32(x, m, (17, 26), params, philox_normal((2, 4, 17, 26), 1234, DEVICE))
    assert rel_err(out, expected) < TOL[dtype]
    other = transition_triton(x, m, (17, 26), params, seed=1235)
    assert rel_err(other, out) > 0.1
    torch.testing.assert_close(transition_triton(x, m, (17, 26), params, seed=1234), out, rtol=0, atol=0)


def test_philox_noise_is_standard_normal():
    from postdiff_compile.kernels.transition_triton import philox_normal

    z = philox_normal((2, 4, 128, 128), 7, DEVICE)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs(z.flatten()[:-1].mul(z.flatten()[1:]).mean().item()) < 0.01  # neighbours uncorrelated
    assert torch.equal(philox_normal((3, 5), 7, DEVICE).flatten(), philox_normal((15,), 7, DEVICE))
    assert not torch.equal(philox_normal((15,), 7, DEVICE), philox_normal((15,), 8, DEVICE))


# --- the custom op -----------------------------------------------------------------------------------------

def test_op_on_cpu_is_the_reference():
    x, m, noise = make_inputs(2, 6, 6, 8, 8)
    params = TransitionParams("v_prediction", 0.3, 0.6, clamp_x0=1.5)
    assert torch.equal(resolution_transition(x, m, (8, 8), params, noise=noise),
                       transition_reference(x, m, (8, 8), params, noise))
    predicted = TransitionParams("epsilon", 0.3, 0.6, "predicted")
    assert torch.equal(resolution_transition(x, m, (8, 8), predicted), transition_reference(x, m, (8, 8), predicted))
    # Seed without a Triton kernel: torch's CPU generator, documented as another stream than Philox.
    seeded = resolution_transition(x.half(), m.half(), (8, 8), params, seed=3)
    cpu_noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert seeded.dtype == torch.float16
    assert torch.equal(seeded, transition_reference(x.half().float(), m.half().float(), (8, 8), params,
                                                    cpu_noise).half())
    assert not kernel_available("cpu")


@pytest.mark.parametrize("args", [
    ("fresh-noise", torch.float32, "epsilon", "fresh", 0.0, None),
    ("predicted", torch.float16, "sample", "predicted", 1.0, None),
    ("seeded", torch.bfloat16, "v_prediction", "fresh", 0.0, 11),
], ids=lambda a: a[0])
def test_opcheck(args):
    _, dtype, prediction_type, renoise, clamp, seed = args
    ensure_registered()
    x, m, noise = make_inputs(2, 6, 6, 8, 8, dtype=dtype, renoise="fresh" if seed is None else "predicted")
    if renoise == "predicted":
        noise = None
    torch.library.opcheck(torch.ops.postdiff.resolution_transition.default,
                          (x, m, noise, 8, 8, prediction_type, 0.3, 0.6, renoise, clamp, seed))


def test_fake_and_meta_shapes():
    params = TransitionParams("epsilon", 0.3, 0.6)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 4, 6, 6, dtype=torch.bfloat16)
        out = resolution_transition(x, x, (8, 9), params, noise=torch.empty(2, 4, 8, 9, dtype=torch.bfloat16))
    assert out.shape == (2, 4, 8, 9) and out.dtype == torch.bfloat16
    x = torch.empty(1, 4, 48, 48, dtype=torch.float16, device="meta")
    out = resolution_transition(x, x, (96, 96), params, seed=0)
    assert out.shape == (1, 4, 96, 96) and out.dtype == torch.float16 and out.device.type == "meta"


def test_op_is_captured_by_torch_export():
    params = TransitionParams("epsilon", 0.3, 0.6)

    class Transition(torch.nn.Module):
        def forward(self, x, m, noise):
            return resolution_transition(x, m, (8, 8), params, noise=noise)

    x, m, noise = make_inputs(2, 6, 6, 8, 8)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(Transition(), (x, m, noise), dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.postdiff.resolution_transition.default]
    x, m, noise = make_inputs(3, 6, 6, 8, 8, seed=1)
    assert torch.equal(ep.module()(x, m, noise), transition_reference(x, m, (8, 8), params, noise))


def test_importing_registers_nothing_and_imports_no_triton():
    code = ("import sys, torch; import postdiff_compile.kernels.transition_op, "
            "postdiff_compile.kernels.transition_ref; "
            "print('triton' in sys.modules, hasattr(torch.ops.postdiff, 'resolution_transition'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --- bad inputs --------------------------------------------------------------------------------------------

def _call(fn, **changes):
    """fn(sample, model_output, size, params, noise) with one argument changed."""
    x, m, noise = make_inputs(1, 4, 4, 8, 8)
    kw = dict(sample=x, model_output=m, size=(8, 8), params=TransitionParams("epsilon", 0.5, 0.6), noise=noise)
    kw.update(changes)
    return fn(kw["sample"], kw["model_output"], kw["size"], kw["params"], noise=kw["noise"], **kw.get("extra", {}))


BAD = [
    (dict(sample=torch.zeros(4, 4, 4)), "4-D"),
    (dict(model_output=torch.zeros(1, 4, 4, 5)), "model_output shape"),
    (dict(model_output=torch.zeros(1, 4, 4, 4, dtype=torch.float16)), "model_output dtype"),
    (dict(sample=torch.zeros(1, 4, 4, 4, dtype=torch.int32), model_output=torch.zeros(1, 4, 4, 4, dtype=torch.int32)),
     "float32, float16, bfloat16"),
    (dict(noise=None), "needs a noise tensor"),
    (dict(noise=torch.zeros(1, 4, 8, 9)), "noise shape"),
    (dict(noise=torch.zeros(1, 4, 8, 8, dtype=torch.bfloat16)), "noise dtype"),
    (dict(params=TransitionParams("epsilon", 0.5, 0.6, "predicted")), "takes no noise"),
    (dict(size=(8, 0)), "size"),
    (dict(size=8), "size"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[m for _, m in BAD])
@pytest.mark.parametrize("which", ["reference", "op"])
def test_bad_inputs(which, changes, message):
    fn = transition_reference if which == "reference" else resolution_transition
    with pytest.raises(ValueError, match=message):
        _call(fn, **changes)


def test_bad_seed_combinations():
    x, m, noise = make_inputs(1, 4, 4, 8, 8)
    params = TransitionParams("epsilon", 0.5, 0.6)
    with pytest.raises(ValueError, match="not both"):
        resolution_transition(x, m, (8, 8), params, noise=noise, seed=1)
    with pytest.raises(ValueError, match="seed must be"):
        resolution_transition(x, m, (8, 8), params, seed=-1)
    with pytest.raises(ValueError, match="no seed"):
        resolution_transition(x, m, (8, 8), TransitionParams("epsilon", 0.5, 0.6, "predicted"), seed=1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(prediction_type="x0"), "'x0'"),
    (dict(renoise="zero"), "'zero'"),
    (dict(alpha_bar_t=1.0), "alpha_bar_t"),
    (dict(alpha_bar_t=0.0), "alpha_bar_t"),
    (dict(alpha_bar_next=0.0), "alpha_bar_next"),
    (dict(alpha_bar_next=1.5), "alpha_bar_next"),
    (dict(clamp_x0=-1.0), "clamp_x0"),
    (dict(clamp_x0=float("nan")), "clamp_x0"),
])
def test_bad_params(kwargs, message):
    base = dict(prediction_type="epsilon", alpha_bar_t=0.5, alpha_bar_next=0.6)
    with pytest.raises(ValueError, match=message):
        TransitionParams(**{**base, **kwargs})

"""The teacher-vs-student gradient-ERF figure (the paper's Fig. 9) and its maths."""
import numpy as np
import pytest
import torch

from attnprobe.report import load_report
from deltadistill.gradient_erf import gradient_erf, plot_gradient_erf
from figcheck import DPI, check_figure


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from attnprobe import analyze
    from attnprobe.core.registry import load_pipeline

    run = tmp_path_factory.mktemp("run")
    pipe, spec = load_pipeline("tiny-pixart")
    report = analyze(pipe, ["a photo of a cat"], steps=2, timestep_buckets=2, model_info={"alias": spec.alias, "source": spec.source})
    report.save(run / "erf.json")
    return run


def test_gradient_erf_known_reach():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4)

    def grid_fn(x):  # [1, H, W, C] → [1, H, W, C], reach 3×3
        return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    g = gradient_erf(grid_fn, (7, 9), 4, layout="grid", samples=2)
    assert g.shape == (7, 9)
    nz = np.argwhere(g > 0)
    assert nz.min(0).tolist() == [2, 3] and nz.max(0).tolist() == [4, 5]

    g = gradient_erf(lambda x: x * 2.0, (5, 5), 3)  # token-wise: only the centre token
    assert np.count_nonzero(g) == 1 and g[2, 2] == pytest.approx(6.0)


def test_gradient_erf_figure(run_dir, tmp_path):
    import deltadistill.conversion as dconv
    from attnprobe.core.registry import load_pipeline

    report = load_report(run_dir)
    teacher, _ = load_pipeline("tiny-pixart")
    student, _ = load_pipeline("tiny-pixart")
    dconv.convert(student, 3)
    with torch.no_grad():  # an untrained block has proj_out = 0; give it some reach
        for mod in dconv.delta_modules(student).values():
            mod.block.proj_out.weight.normal_(std=0.1)
    paths = plot_gradient_erf(report, tmp_path, teacher, student, max_layers=2, steps=2, dpi=DPI)
    check_figure(paths, "gradient_erf")


def test_student_local_branch_reach_follows_its_kernel():
    """Without the global branch the gradient ERF of a block tells kernel sizes apart (it did not before)."""
    from deltadistill.block import DeltaConvBlock
    from deltadistill.gradient_erf import _box_share

    torch.manual_seed(0)
    reach = {}
    for k in (3, 7):
        block = DeltaConvBlock(16, k, scales=(1,))
        with torch.no_grad():
            for p in block.parameters():
                p.normal_(0, 0.3)
        g_local = gradient_erf(block.local, (15, 15), 16, layout="grid", samples=2)
        g_full = gradient_erf(block, (15, 15), 16, layout="grid", samples=2)
        nz = np.argwhere(g_local > 1e-12)
        reach[k] = int(nz.max(0)[0] - nz.min(0)[0] + 1)
        assert np.count_nonzero(g_full > 1e-12) == 15 * 15  # the global branch reaches every token
        ks, share = _box_share(g_local, (7, 7))
        assert share[ks.tolist().index(k)] == pytest.approx(1.0)
    assert reach == {3: 3, 7: 7}


def test_mean_field_part_of_uniform_attention_is_all_of_it():
    from diffusers.models.attention_processor import Attention

    from deltadistill.gradient_erf import mean_field

    attn = Attention(16, heads=2, dim_head=8)
    with torch.no_grad():
        attn.to_q.weight.zero_()  # zero queries: uniform attention
    z = torch.randn(2, 12, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(z), mean_field(attn, z), atol=1e-6, rtol=1e-5)

"""The trajectory recipe: recording teacher trajectories, replaying them, regression, resumable training."""
import shutil

import pytest
import torch

from attnprobe.core.family import denoiser_of, find_self_attention
from attnprobe.core.registry import load_pipeline
from deltadistill.trajectory import record_trajectories, regression_loss, replay
from deltadistill.train import TrainConfig, train
from deltadistill.train_config import TrainError
from deltadistill.checkpoints import list_checkpoints
from safetensors.torch import load_file


@pytest.mark.parametrize("alias", ["tiny-pixart", "tiny-sd15"])
def test_recorded_states_replay_to_the_teacher_output(alias):
    pipe, _ = load_pipeline(alias)
    den = denoiser_of(pipe)
    sites = find_self_attention(den)
    traj = record_trajectories(pipe, ["a photo of cat", "a red dog"], [0, 1], steps=3, resolution=32, sites=sites)
    assert len(traj) == 2 * 2 * 3 * 2  # prompts × seeds × steps × (uncond, cond)
    assert torch.equal(traj.pair[traj.pair], torch.arange(len(traj)))  # partners pair up
    assert traj.guidance > 1
    idx = torch.tensor([0, 5, len(traj) - 1])
    with torch.no_grad():
        out = replay(den, traj, idx)
    torch.testing.assert_close(out, traj.out[idx], atol=1e-5, rtol=1e-4)
    for site, x, y, grid in zip(sites, traj.x, traj.y, traj.grids):
        assert x.shape[0] == len(traj) and x.shape[1] == grid[0] * grid[1] and y.shape == x.shape, site.name
    # the recorded output of a layer is what the module gives on the recorded input
    with torch.no_grad():
        y0 = sites[0].module(traj.x[0][idx].float())
    torch.testing.assert_close(y0, traj.y[0][idx].float(), atol=2e-3, rtol=2e-2)  # fp16 storage


def test_regression_loss_is_the_layerwise_mse():
    from deltadistill.block import DeltaConvBlock

    pipe, _ = load_pipeline("tiny-pixart")
    sites = find_self_attention(denoiser_of(pipe))
    traj = record_trajectories(pipe, ["a cat"], [0], steps=2, resolution=32, sites=sites)
    torch.manual_seed(0)
    blocks = [DeltaConvBlock(x.shape[-1], 3) for x in traj.x]
    for b in blocks:
        torch.nn.init.normal_(b.proj_out.weight, std=0.1)
    idx = torch.tensor([1, 2])
    total, parts = regression_loss(blocks, traj, idx)
    by_hand = []
    for b, x, y, (h, w) in zip(blocks, traj.x, traj.y, traj.grids):
        xb = x[idx].float()
        by_hand.append(((b(xb.reshape(2, h, w, -1)).reshape(xb.shape) - y[idx].float()) ** 2).mean().item())
    assert parts == pytest.approx(by_hand, rel=1e-6) and float(total.detach()) == pytest.approx(sum(by_hand), rel=1e-6)

    # with the guided term: idx as [cond; uncond] pairs, + weight · mean (guided pred − guided y)² per layer
    from deltadistill.trajectory import cfg_pairs

    pairs = cfg_pairs(traj, torch.tensor([0, 3]))
    total, parts = regression_loss(blocks, traj, pairs, cfg_weight=0.5)
    wg, by_hand = traj.guidance, []
    for b, x, y, (h, w) in zip(blocks, traj.x, traj.y, traj.grids):
        xb = x[pairs].double()
        p = b.double()(xb.reshape(4, h, w, -1)).reshape(xb.shape)
        b.float()
        t = y[pairs].double()
        g_p, g_t = p[2:] + wg * (p[:2] - p[2:]), t[2:] + wg * (t[:2] - t[2:])
        by_hand.append(float((((p - t) ** 2).mean() + 0.5 * ((g_p - g_t) ** 2).mean()).detach()))
    assert parts == pytest.approx(by_hand, rel=1e-5) and float(total.detach()) == pytest.approx(sum(by_hand), rel=1e-5)


def test_symmetries_of_the_grid_are_exact_training_pairs():
    """Self-attention commutes with every turn and flip of its token grid, so a moved (x, y) pair is the
    teacher's own; regression_loss(symmetry=k) is the MSE of the block on the moved pair."""
    from deltadistill.block import DeltaConvBlock
    from deltadistill.trajectory import dihedral

    pipe, _ = load_pipeline("tiny-pixart")
    sites = find_self_attention(denoiser_of(pipe))
    traj = record_trajectories(pipe, ["a cat"], [0], steps=2, resolution=32, sites=sites)
    h, w = traj.grids[0]
    x = traj.x[0][:2].double().reshape(2, h, w, -1)  # [2, H, W, C]
    attn = sites[0].module.double()
    seen = set()
    with torch.no_grad():
        for k in range(8):
            moved = dihedral(x, k)
            seen.add(moved.flatten().numpy().tobytes()[:4096])
            y_moved = attn(moved.reshape(2, h * w, -1)).reshape(2, h, w, -1)
            torch.testing.assert_close(y_moved, dihedral(attn(x.reshape(2, h * w, -1)).reshape(2, h, w, -1), k))
    attn.float()
    assert len(seen) == 8  # eight different symmetries
    # k ≥ 4 is the flip of k - 4; four quarter turns are the identity
    torch.testing.assert_close(dihedral(x, 5), dihedral(x, 1).flip(2))
    torch.testing.assert_close(dihedral(dihedral(x, 1), 3), x)
    with pytest.raises(ValueError, match="quarter"):
        dihedral(torch.zeros(1, 2, 3, 4), 1)
    assert dihedral(torch.zeros(1, 2, 3, 4), 6).shape == (1, 2, 3, 4)

    torch.manual_seed(0)
    blocks = [DeltaConvBlock(t.shape[-1], 3) for t in traj.x]
    for b in blocks:
        torch.nn.init.normal_(b.proj_out.weight, std=0.1)
    idx = torch.tensor([1, 2])
    _, parts = regression_loss(blocks, traj, idx, symmetry=3)
    _, plain = regression_loss(blocks, traj, idx)
    by_hand = []
    for b, xs, ys, (gh, gw) in zip(blocks, traj.x, traj.y, traj.grids):
        xm = dihedral(xs[idx].float().reshape(2, gh, gw, -1), 3)
        ym = dihedral(ys[idx].float().reshape(2, gh, gw, -1), 3)
        by_hand.append(((b(xm.contiguous()) - ym) ** 2).mean().item())
    assert parts == pytest.approx(by_hand, rel=1e-6)
    assert parts != pytest.approx(plain, rel=1e-3)  # the move changed what the block was asked


def _cfg(prompts, out, **kw):
    base = dict(data=str(prompts), out=str(out), model="tiny-pixart", kernel_size=3, recipe="trajectory",
                regress_steps=6, steps=6, regress_batch=8, batch_size=2, traj_seeds=2, finetune_seeds=2, traj_steps=3,
                warmup=2, lr=1e-2, checkpoint_every=4, progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _cut_after(run, keep: str):
    """The run folder as if killed after checkpoint ``keep``."""
    for p in list_checkpoints(run):
        if p.name > keep:
            shutil.rmtree(p)
    for name in ("config.json", "delta_blocks.safetensors", "summary.json"):
        (run / name).unlink()


def _assert_same_blocks(a_run, b_run):
    """Two runs wrote bit-identical ΔConvBlock weights."""
    a, b = load_file(a_run / "delta_blocks.safetensors"), load_file(b_run / "delta_blocks.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


# inside the regression, inside the fine-tune; and inside a fine-tune that draws on a third sample per prompt
@pytest.mark.parametrize("resume_at, finetune_seeds", [("step-0000004", 2), ("step-0000008", 2), ("step-0000008", 3)])
def test_trajectory_run_resumes_exactly(tmp_path, resume_at, finetune_seeds):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of cat\na red dog\n")
    full = tmp_path / "full"
    s = train(_cfg(prompts, full, finetune_seeds=finetune_seeds), log=lambda m: None)
    assert s["steps"] == 12 and [h["stage"] for h in s["history"]] == ["regress"] * 6 + ["finetune"] * 6
    part = tmp_path / "part"
    shutil.copytree(full, part)
    _cut_after(part, resume_at)
    train(_cfg(prompts, part, resume="latest", finetune_seeds=finetune_seeds), log=lambda m: None)
    _assert_same_blocks(full, part)


def test_regression_stage_lowers_the_layerwise_error(tmp_path):
    from deltadistill.conversion import convert, delta_modules
    from deltadistill.generate import load_distilled
    from deltadistill.trajectory_train import trajectory_seeds

    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of cat\na red dog\n")
    train(_cfg(prompts, tmp_path / "run", regress_steps=120, steps=1, regress_lr=1e-2, lr=1e-7, checkpoint_every=0),
          log=lambda m: None)
    pipe, _ = load_pipeline("tiny-pixart")
    sites = find_self_attention(denoiser_of(pipe))
    traj = record_trajectories(pipe, ["a photo of cat", "a red dog"], trajectory_seeds(0, 2), steps=3, resolution=32,
                               sites=sites)
    everything = torch.arange(len(traj))
    torch.manual_seed(0)
    convert(pipe, 3)  # the run's starting point (same seed, mean-field init)
    names = [s.name for s in sites]
    start = delta_modules(pipe)
    trained = delta_modules(load_distilled(tmp_path / "run")[0])
    with torch.no_grad():
        before = regression_loss([start[n].block for n in names], traj, everything)[0]
        after = regression_loss([trained[n].block for n in names], traj, everything)[0]
    assert float(after) < 0.9 * float(before)


@pytest.fixture()
def untrimmed(monkeypatch):
    """Recordings keep every text position (as the memory check and ``train --estimate`` project them)."""
    from attnprobe.core.families.pixart import PixArt

    monkeypatch.setattr(PixArt, "trim_text", lambda self, kwargs: None)


def test_trimmed_text_replays_to_the_same_outputs(monkeypatch):
    """PixArt's recordings drop the text positions every caption masks out; nothing the student sees changes."""
    from attnprobe.core.families.pixart import PixArt
    from deltadistill.trajectory import join_states

    pipe, _ = load_pipeline("tiny-pixart")
    den = denoiser_of(pipe)
    short = record_trajectories(pipe, ["a cat"], [0], steps=2, resolution=32)
    long = record_trajectories(pipe, ["a red dog on the grass"], [1], steps=2, resolution=32)
    both = join_states(short, long)
    with monkeypatch.context() as m:
        m.setattr(PixArt, "trim_text", lambda self, kwargs: None)
        full = join_states(record_trajectories(pipe, ["a cat"], [0], steps=2, resolution=32),
                           record_trajectories(pipe, ["a red dog on the grass"], [1], steps=2, resolution=32))
    n_short, n_long, n_full = (t.batched["encoder_hidden_states"].shape[1] for t in (short, long, full))
    assert n_short < n_long == both.batched["encoder_hidden_states"].shape[1] < n_full == 16
    assert not both.batched["encoder_attention_mask"][: len(short), n_short:].any()  # the padding join_states adds
    idx = torch.arange(len(both))
    with torch.no_grad():
        torch.testing.assert_close(replay(den, both, idx), replay(den, full, idx), rtol=0, atol=1e-6)
    torch.testing.assert_close(both.out, full.out)


def test_join_states_refuses_recordings_of_another_resolution():
    """Only text lengths may differ between joined recordings (they are padded); other sizes are an error."""
    from deltadistill.trajectory import join_states

    pipe, _ = load_pipeline("tiny-pixart")
    small = record_trajectories(pipe, ["a cat"], [0], steps=1, resolution=32)
    large = record_trajectories(pipe, ["a cat"], [0], steps=1, resolution=64)
    with pytest.raises(ValueError, match="differ in more than their length"):
        join_states(small, large)


def test_recording_that_would_not_fit_is_refused_after_one_call(untrimmed):
    """The projection from the first denoiser call (its bytes × the calls to come) is checked first."""
    from deltadistill.trajectory import TrajectoryMemoryError

    pipe, _ = load_pipeline("tiny-pixart")
    den = denoiser_of(pipe)
    sites = find_self_attention(den)
    calls = []
    handle = den.register_forward_hook(lambda *a: calls.append(1))
    try:
        full = record_trajectories(pipe, ["a cat", "a dog"], [0], steps=3, resolution=32, sites=sites)
        need = full.info["layer_bytes"] + full.out.numel() * 4 + sum(v.numel() * v.element_size() for v in full.batched.values())
        calls.clear()
        with pytest.raises(TrajectoryMemoryError, match="--traj-keep-every"):
            record_trajectories(pipe, ["a cat", "a dog"], [0], steps=3, resolution=32, sites=sites, budget=need - 1)
        assert len(calls) == 1  # stopped at the first call, not after sampling everything
        again = record_trajectories(pipe, ["a cat", "a dog"], [0], steps=3, resolution=32, sites=sites, budget=need)
    finally:
        handle.remove()
    assert len(again) == len(full)
    # without layer tensors (the fine-tune's further samples) the call's inputs are most of what is kept
    states = record_trajectories(pipe, ["a cat", "a dog"], [0], steps=3, resolution=32)
    kept = states.out.numel() * 4 + sum(v.numel() * v.element_size() for v in states.batched.values())
    assert kept > 1.5 * states.out.numel() * 4
    with pytest.raises(TrajectoryMemoryError):
        record_trajectories(pipe, ["a cat", "a dog"], [0], steps=3, resolution=32, budget=kept - 1)
    assert len(record_trajectories(pipe, ["a cat", "a dog"], [0], steps=3, resolution=32, budget=kept)) == len(states)


def test_cli_refuses_a_recording_beyond_memory(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import attnprobe.core.registry as registry
    from deltadistill.cli import app

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    monkeypatch.setattr(registry, "_available_memory", lambda: 1000)
    res = CliRunner().invoke(app, ["train", "--model", "tiny-pixart", "--data", str(prompts), "--out", str(tmp_path / "run"),
                                   "--kernel-size", "3", "--recipe", "trajectory", "--steps", "2", "--regress-steps", "2",
                                   "--traj-steps", "2", "--traj-seeds", "1", "--no-progress"])
    assert res.exit_code != 0
    assert "GiB of recorded states" in res.output and "Traceback" not in res.output


def test_toolkit_preset_gives_the_trajectory_fine_tune_its_own_lr(tmp_path):
    base = dict(data="p.txt", out=str(tmp_path / "r"), kernel_size=3)
    assert (TrainConfig(recipe="trajectory", **base).resolved().lr, TrainConfig(recipe="trajectory", **base).resolved().warmup) \
        == (5e-4, 20)
    assert TrainConfig(recipe="noised", **base).resolved().lr == 3e-4  # the noised recipe keeps the preset's
    assert TrainConfig(recipe="trajectory", lr=1e-3, warmup=5, **base).resolved().lr == 1e-3  # a flag wins
    assert TrainConfig(recipe="trajectory", preset="paper", **base).resolved().lr == 3e-4


def _symmetries_used(tmp_path, monkeypatch, name, **kw):
    import deltadistill.trajectory_train as tt

    used, logs = [], []
    real = regression_loss  # deltadistill.trajectory's, not an earlier spy

    def spy(blocks, traj, idx, device=None, symmetry=0, **kw):
        used.append(symmetry)
        calls.append((traj, idx, kw))
        return real(blocks, traj, idx, device=device, symmetry=symmetry, **kw)

    calls = _symmetries_used.calls = []

    monkeypatch.setattr(tt, "regression_loss", spy)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of cat\na red dog\n")
    s = train(_cfg(prompts, tmp_path / name, regress_steps=16, steps=1, checkpoint_every=0, **kw), log=logs.append)
    return used, logs, s


def test_regression_draws_the_symmetries_of_the_grid(tmp_path, monkeypatch):
    used, _, _ = _symmetries_used(tmp_path, monkeypatch, "eight")  # the toolkit preset: 8
    assert len(used) == 16 and set(used) <= set(range(8)) and len(set(used)) >= 4
    again, _, _ = _symmetries_used(tmp_path, monkeypatch, "again")
    assert again == used  # drawn from (seed, step): a resumed run draws the same
    four, _, _ = _symmetries_used(tmp_path, monkeypatch, "four", regress_symmetries=4)
    assert set(four) <= {0, 1, 2, 3} and len(set(four)) > 1
    none, _, _ = _symmetries_used(tmp_path, monkeypatch, "none", regress_symmetries=1)
    assert set(none) == {0}


def test_regression_draws_cfg_pairs_for_its_guided_term(tmp_path, monkeypatch):
    """The toolkit preset regresses with the guided layer term: each batch is regress_batch states as CFG pairs
    [cond; uncond]; --regress-cfg-loss 0 draws plain states with no guided term."""
    _symmetries_used(tmp_path, monkeypatch, "guided", regress_batch=8)
    assert len(_symmetries_used.calls) == 16
    for traj, idx, kw in _symmetries_used.calls:
        assert kw["cfg_weight"] == 1.0 and len(idx) == 8
        assert torch.equal(traj.pair[idx[:4]], idx[4:])  # partners
        assert bool((traj.pair[idx[4:]] > idx[4:]).all())  # PixArt batches [uncond; cond]: the second half is uncond
    _symmetries_used(tmp_path, monkeypatch, "plain", regress_batch=8, regress_cfg_loss=0.0)
    assert all(kw["cfg_weight"] == 0.0 and len(idx) == 8 for _, idx, kw in _symmetries_used.calls)
    assert any(not torch.equal(traj.pair[idx[:4]], idx[4:]) for traj, idx, _ in _symmetries_used.calls)


def test_rotary_models_regress_without_symmetries(tmp_path, monkeypatch):
    from attnprobe.core.families.pixart import PixArt
    from attnprobe.core.family import family_named

    assert not family_named("hunyuan").attention_equivariant and family_named("pixart").attention_equivariant
    monkeypatch.setattr(PixArt, "attention_equivariant", False)  # as if its attention had rotary embeddings
    used, logs, _ = _symmetries_used(tmp_path, monkeypatch, "rotary")
    assert set(used) == {0}
    assert any("rotary position embeddings" in m and "--regress-symmetries 1" in m for m in logs)
    import json
    assert json.loads((tmp_path / "rotary" / "train_config.json").read_text())["regress_symmetries"] == 1


def test_regress_symmetries_out_of_range_is_a_usage_error(tmp_path):
    from deltadistill.train_config import TrainError, validate

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    for bad in (0, 9):
        with pytest.raises(TrainError, match="--regress-symmetries must be 1"):
            validate(_cfg(prompts, tmp_path / "r", regress_symmetries=bad))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(TrainError, match="--regress-cfg-loss must be a number >= 0"):
            validate(_cfg(prompts, tmp_path / "r", regress_cfg_loss=bad))
        with pytest.raises(TrainError, match="--cfg-loss must be a number >= 0"):
            validate(_cfg(prompts, tmp_path / "r", cfg_loss=bad))
    with pytest.raises(TrainError, match="--regress-cfg-loss needs --regress-batch >= 2"):
        validate(_cfg(prompts, tmp_path / "r", regress_batch=1))  # the toolkit preset's guided term draws pairs
    validate(_cfg(prompts, tmp_path / "r", regress_batch=1, regress_cfg_loss=0.0))  # plain states: one is enough
    for bad in (0, -3):
        with pytest.raises(TrainError, match="--finetune-seeds must be >= 1"):
            validate(_cfg(prompts, tmp_path / "r", finetune_seeds=bad))
    # the preset's value, never fewer than the regression's samples, none without a fine-tune
    assert validate(_cfg(prompts, tmp_path / "r", finetune_seeds=None)).finetune_trajectories == 8
    assert validate(_cfg(prompts, tmp_path / "r", traj_seeds=5, finetune_seeds=3)).finetune_trajectories == 5
    assert validate(_cfg(prompts, tmp_path / "r", finetune_seeds=None, steps=0)).finetune_trajectories == 2
    assert validate(_cfg(prompts, tmp_path / "r", finetune_seeds=None, preset="paper")).finetune_trajectories == 2


@pytest.mark.parametrize("alias, prompts", [("tiny-pixart", ["a photo of cat", "a red dog"]), ("tiny-dit", ["cat", "dog"])])
def test_cfg_pairs_give_cond_rows_then_their_uncond_partners(alias, prompts):
    """Whichever half of its CFG batch a state was drawn from, cfg_pairs returns [cond; uncond] in the family's
    row order ([uncond; cond] for PixArt, [cond; uncond] for DiT), so that guided() is u + w·(c − u)."""
    from deltadistill.trajectory import cfg_pairs

    pipe, _ = load_pipeline(alias)
    traj = record_trajectories(pipe, prompts, [0], steps=2, resolution=32, sites=())
    assert traj.cond_first == (alias == "tiny-dit")
    idx = torch.arange(len(traj))
    rows = cfg_pairs(traj, idx)
    cond, uncond = rows[: len(idx)], rows[len(idx):]
    assert torch.equal(traj.pair[cond], uncond)
    assert set(cond.tolist()).isdisjoint(uncond.tolist()) and len(set(cond.tolist())) == len(idx) // 2
    if alias == "tiny-dit":  # the null class in every uncond row, a real class in every cond row
        labels = traj.batched["class_labels"]
        assert len(set(labels[uncond].tolist())) == 1 and labels[uncond][0] not in set(labels[cond].tolist())
        assert len(set(labels[cond].tolist())) == 2
    else:  # the uncond rows all carry the empty prompt's embedding; the cond rows differ between prompts
        e = traj.batched["encoder_hidden_states"].float()
        assert all(torch.equal(e[u], e[uncond[0]]) for u in uncond)
        assert all(not torch.equal(e[c], e[uncond[0]]) for c in cond)


def test_sampler_output_keeps_the_eps_half_of_a_learned_sigma_output():
    from deltadistill.trajectory import sampler_output

    out = torch.randn(3, 8, 8, 8)
    assert torch.equal(sampler_output(out, 4), out[:, :4])  # PixArt, DiT: [ε; variance] for 4 latent channels
    same = torch.randn(3, 4, 8, 8)
    assert sampler_output(same, 4) is same  # SD, SD3: the whole output
    tokens = torch.randn(3, 64, 16)  # FLUX: packed tokens; dim 1 is 2 × 32 but counts tokens, not channels
    assert sampler_output(tokens, 32) is tokens
    assert sampler_output(out, None) is out


def test_fine_tune_compares_only_the_channels_the_sampler_uses(tmp_path, monkeypatch):
    """tiny-pixart predicts [ε; learned variance]: a student whose ε half equals the teacher's has zero output and
    guided-output loss in the fine-tune, whatever its variance half says (the sampler drops that half)."""
    import json

    import deltadistill.trajectory_train as tt

    def replay_eps_exact(model, traj, idx, device=None, dtype=None):
        out = traj.out[idx].clone()
        assert out.shape[1] == 2 * traj.batched["hidden_states"].shape[1]  # learned σ
        out[:, out.shape[1] // 2:] += 1.0  # the variance half is off by 1 everywhere
        return out.requires_grad_()

    monkeypatch.setattr(tt, "replay", replay_eps_exact)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of cat\n")
    train(_cfg(prompts, tmp_path / "run", regress_steps=2, steps=3, checkpoint_every=0))
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fine = [r for r in recs if r.get("stage") == "finetune"]
    assert len(fine) == 3 and all(r["l_z"] == 0 and r["gap"] == 0 for r in fine)


def test_trajectories_without_guidance_drop_the_guided_terms(tmp_path):
    """Sampled with guidance 1 there are no CFG pairs (every state is its own partner): the guided terms would
    only double-count states, so the run drops them, says so, and records the weights it used."""
    import json

    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of cat\n")
    logs = []
    train(_cfg(prompts, tmp_path / "run", regress_steps=2, steps=2, checkpoint_every=0, sample_guidance=1.0),
          log=logs.append)
    assert any("dropping the guided terms" in m for m in logs)
    used = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert used["regress_cfg_loss"] == 0 and used["cfg_loss"] == 0
    logs.clear()
    train(_cfg(prompts, tmp_path / "guided", regress_steps=2, steps=2, checkpoint_every=0), log=logs.append)
    assert not any("dropping the guided terms" in m for m in logs)
    assert json.loads((tmp_path / "guided" / "train_config.json").read_text())["cfg_loss"] == 4.0


def test_resume_refuses_other_loss_weights_and_keeps_the_run(tmp_path):
    """A resumed run that would switch the guided-term weights mid-run is refused before anything is written; a
    setting the data do not change (--traj-steps) is refused before any trajectory is recorded; a value that came
    from the preset names the flag that restores the checkpoint's."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of cat\na red dog\n")
    run = tmp_path / "run"
    train(_cfg(prompts, run, cfg_loss=0.25, regress_cfg_loss=1.0), log=lambda m: None)
    _cut_after(run, "step-0000004")
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    with pytest.raises(TrainError, match=r"trained with cfg_loss=0\.25, now 1\.0; resume with the same settings"):
        train(_cfg(prompts, run, resume="latest", cfg_loss=1.0, regress_cfg_loss=1.0), log=lambda m: None)
    with pytest.raises(TrainError, match=r"trained with regress_cfg_loss=1\.0, now 0\.0"):
        train(_cfg(prompts, run, resume="latest", cfg_loss=0.25, regress_cfg_loss=0.0), log=lambda m: None)
    with pytest.raises(TrainError, match=r"cfg_loss=0\.25, now 4\.0; 4\.0 is the toolkit preset's value now; "
                                         r"pass --cfg-loss 0\.25"):
        train(_cfg(prompts, run, resume="latest", cfg_loss=None, regress_cfg_loss=1.0), log=lambda m: None)
    said = []
    with pytest.raises(TrainError, match=r"trained with traj_steps=3, now 4"):
        train(_cfg(prompts, run, resume="latest", cfg_loss=0.25, regress_cfg_loss=1.0, traj_steps=4), log=said.append)
    assert not any("recording teacher trajectories" in m for m in said)  # refused before the data
    with pytest.raises(TrainError, match=r"trained with finetune_seeds=2, now 3"):  # other states for the fine-tune
        train(_cfg(prompts, run, resume="latest", cfg_loss=0.25, regress_cfg_loss=1.0, finetune_seeds=3), log=said.append)
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_resume_of_a_run_without_cfg_pairs_is_not_refused(tmp_path):
    """Without guidance the run drops its guided terms; resuming with the same options drops them again."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of cat\na red dog\n")
    full, run = tmp_path / "full", tmp_path / "run"
    kw = dict(sample_guidance=1.0, cfg_loss=4.0, regress_cfg_loss=1.0)
    train(_cfg(prompts, full, **kw), log=lambda m: None)
    shutil.copytree(full, run)
    _cut_after(run, "step-0000008")
    train(_cfg(prompts, run, resume="latest", **kw), log=lambda m: None)
    _assert_same_blocks(full, run)


def test_resume_compares_the_data_not_their_path(tmp_path):
    """Other prompts are refused before anything is recorded; the same prompts in another file resume exactly."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of cat\na red dog\n")
    full, run = tmp_path / "full", tmp_path / "run"
    train(_cfg(prompts, full), log=lambda m: None)
    shutil.copytree(full, run)
    _cut_after(run, "step-0000004")
    other = tmp_path / "other.txt"
    other.write_text("a photo of cat\na blue dog\n")
    said = []
    with pytest.raises(TrainError, match="trained on other data than --data"):
        train(_cfg(other, run, resume="latest"), log=said.append)
    assert not any("recording teacher trajectories" in m for m in said)
    moved = tmp_path / "moved" / "prompts.txt"
    moved.parent.mkdir()
    moved.write_text(prompts.read_text())
    train(_cfg(moved, run, resume="latest"), log=lambda m: None)
    _assert_same_blocks(full, run)


def test_join_states_keeps_both_recordings_and_their_pairs():
    from deltadistill.trajectory import join_states

    pipe, _ = load_pipeline("tiny-pixart")
    den = denoiser_of(pipe)
    a = record_trajectories(pipe, ["a photo of cat"], [0], steps=2, resolution=32, sites=find_self_attention(den))
    b = record_trajectories(pipe, ["a photo of cat", "a red dog"], [1], steps=2, resolution=32)
    j = join_states(a, b)
    assert len(j) == len(a) + len(b) and j.x == [] and j.info["layer_bytes"] == 0
    assert torch.equal(j.pair[j.pair], torch.arange(len(j)))  # partners still pair up, each within its recording
    assert torch.equal(j.pair[: len(a)], a.pair) and torch.equal(j.pair[len(a):], b.pair + len(a))
    idx = torch.tensor([1, len(a), len(j) - 1])
    with torch.no_grad():
        torch.testing.assert_close(replay(den, j, idx), j.out[idx], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(j.out[idx], torch.cat([a.out[1:2], b.out[[0, -1]]]), atol=0, rtol=0)
    unguided = record_trajectories(pipe, ["a red dog"], [1], steps=2, resolution=32, guidance=1.0)
    with pytest.raises(ValueError, match="different calls"):
        join_states(a, unguided)


def test_fine_tune_draws_from_more_seeds_than_the_regression(tmp_path, monkeypatch):
    import deltadistill.trajectory_train as tt

    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of cat\na red dog\n")
    calls, rows = [], []
    real_record, real_replay = tt.record_trajectories, tt.replay

    def record(pipe, prompts, seeds, **kw):
        calls.append((list(seeds), len(kw.get("sites", ()))))
        return real_record(pipe, prompts, seeds, **kw)

    def spy(model, traj, idx, **kw):
        rows.append((len(traj), int(idx.max())))
        return real_replay(model, traj, idx, **kw)

    monkeypatch.setattr(tt, "record_trajectories", record)
    monkeypatch.setattr(tt, "replay", spy)
    s = train(_cfg(prompts, tmp_path / "run", traj_seeds=1, finetune_seeds=3, regress_steps=2, steps=8, batch_size=4,
                   cfg_loss=0.0), log=lambda m: None)
    seeds = tt.trajectory_seeds(0, 3)
    assert calls[0] == ([seeds[0]], 4) and calls[1] == (seeds[1:], 0)  # the regression's with layers, then 2 more without
    states = 2 * 3 * 2  # per seed: prompts × steps × (uncond, cond)
    assert s["data"]["finetune_states"] == 3 * states and s["data"]["states"] == states
    assert {n for n, _ in rows} == {3 * states} and max(i for _, i in rows) >= states  # drawn beyond the regression's
    calls.clear()
    train(_cfg(prompts, tmp_path / "none", traj_seeds=1, finetune_seeds=3, regress_steps=2, steps=0), log=lambda m: None)
    assert len(calls) == 1  # no fine-tune: nothing more is recorded


def test_fine_tune_samples_beyond_memory_name_their_flag(tmp_path, monkeypatch):
    import deltadistill.trajectory_train as tt
    from deltadistill.trajectory import TrajectoryMemoryError

    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of cat\n")
    real_record = tt.record_trajectories

    def record(pipe, prompts, seeds, **kw):
        if not kw.get("sites"):  # the fine-tune's further samples
            raise TrajectoryMemoryError("the trajectory recipe would keep 9.0 GiB of recorded states")
        return real_record(pipe, prompts, seeds, **kw)

    monkeypatch.setattr(tt, "record_trajectories", record)
    with pytest.raises(TrainError, match=r"9\.0 GiB.*further samples per prompt: lower --finetune-seeds \(now 5\)"):
        train(_cfg(prompts, tmp_path / "run", traj_seeds=1, finetune_seeds=5), log=lambda m: None)

"""Sparse autoencoders: definitions, training, dead features, streaming, SAELens format."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from steerlab.errors import ArtifactError, DataError, SteeringError
from steerlab.sae import (
    SAEConfig,
    SparseAutoencoder,
    TrainReport,
    evaluate_sae,
    hook_name_for_site,
    load_saelens,
    save_saelens,
    site_for_hook_name,
    topk_relu,
    train_sae,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FAST: dict[str, Any] = {"epochs": 15, "batch_size": 256, "progress": False}


def _synthetic(n: int = 4096, d: int = 32, n_dirs: int = 128, active: int = 3,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that are sums of exactly ``active`` of ``n_dirs`` random unit directions (weights
    in [0.5, 2.5]), plus small noise, a shared offset and a non-unit scale."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, d, generator=g)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_dirs, generator=g).argsort(dim=1)[:, :active]
    weights = torch.rand(n, active, generator=g) * 2 + 0.5
    codes = torch.zeros(n, n_dirs).scatter(1, idx, weights)
    x = codes @ dirs + 0.01 * torch.randn(n, d, generator=g) + 3 * torch.randn(d, generator=g)
    return 10 * x, dirs


def _random_sae(config: SAEConfig, seed: int = 1) -> SparseAutoencoder:
    """An SAE with every parameter random (non-zero biases, thresholds spread out)."""
    sae = SparseAutoencoder(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "log_threshold":
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 2.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae


def _recovered(sae: SparseAutoencoder, dirs: torch.Tensor, cos: float = 0.9) -> float:
    w = sae.decoder_weight().detach()
    sim = dirs @ (w / w.norm(dim=1, keepdim=True)).T
    return float((sim.max(dim=1).values > cos).float().mean())


def _params(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


# -- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"d_in": 0, "d_sae": 8, "architecture": "relu"}, "d_in must be a positive integer"),
    ({"d_in": 4, "d_sae": -1, "architecture": "relu"}, "d_sae must be a positive integer"),
    ({"d_in": True, "d_sae": 8, "architecture": "relu"}, "d_in"),
    ({"d_in": 4.0, "d_sae": 8, "architecture": "relu"}, "d_in"),
    ({"d_in": 4, "d_sae": 8, "architecture": "gated"}, "unknown SAE architecture 'gated'"),
    ({"d_in": 4, "d_sae": 8, "architecture": "topk"}, r"k in \[1, d_sae = 8\]"),
    ({"d_in": 4, "d_sae": 8, "architecture": "topk", "k": 0}, "k in"),
    ({"d_in": 4, "d_sae": 8, "architecture": "topk", "k": 9}, "k in"),
    ({"d_in": 4, "d_sae": 8, "architecture": "relu", "k": 2}, "k is for topk SAEs only"),
    ({"d_in": 4, "d_sae": 8, "architecture": "relu", "tied": 1}, "tied must be True or False"),
    ({"d_in": 4, "d_sae": 8, "architecture": "jumprelu", "jumprelu_bandwidth": 0.0},
     "jumprelu_bandwidth must be a finite, positive"),
    ({"d_in": 4, "d_sae": 8, "architecture": "jumprelu",
      "jumprelu_init_threshold": math.nan}, "jumprelu_init_threshold"),
    ({"d_in": 4, "d_sae": 8, "architecture": "relu", "site": "layer12"}, "cannot parse"),
    ({"d_in": 4, "d_sae": 8, "architecture": "relu", "site": "resid_post.3",
      "hook_name": "blocks.4.hook_resid_post"}, "disagree"),
])
def test_config_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(SteeringError, match=match):
        SAEConfig(**kwargs)


def test_config_site_and_hook_name_fill_each_other() -> None:
    a = SAEConfig(8, 16, "relu", hook_name="blocks.12.hook_resid_post")
    assert a.site == "resid_post.12"
    b = SAEConfig(8, 16, "relu", site="resid_pre.3")
    assert b.hook_name == "blocks.3.hook_resid_pre"
    c = SAEConfig(8, 16, "relu", hook_name="blocks.2.attn.hook_z")
    assert c.site == ""
    assert site_for_hook_name("blocks.0.hook_resid_post") == "resid_post.0"
    assert hook_name_for_site("heads.3") == ""
    assert SAEConfig(**asdict(a)) == a  # what SAS artifacts rely on


# -- definitions -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_shapes_any_leading_dims_float32(arch: str) -> None:
    cfg = SAEConfig(6, 20, arch, k=5 if arch == "topk" else None)
    sae = _random_sae(cfg)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    f = sae.encode(x)
    assert f.shape == (2, 3, 20) and f.dtype == torch.float32
    out = sae(x)
    assert out.shape == (2, 3, 6) and out.dtype == torch.float32
    assert torch.equal(out, sae.decode(f))
    flat = sae.encode(x.reshape(6, 6)).reshape(2, 3, 20)
    torch.testing.assert_close(f, flat)


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_pre_acts_and_decode_match_the_formulas(apply_b_dec: bool) -> None:
    sae = _random_sae(SAEConfig(5, 7, "relu", apply_b_dec_to_input=apply_b_dec))
    x = torch.randn(4, 5)
    centred = x - sae.b_dec if apply_b_dec else x
    expected = centred @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.pre_acts(x), expected)
    f = torch.rand(4, 7)
    torch.testing.assert_close(sae.decode(f), f @ sae.W_dec + sae.b_dec)


def test_activations_match_hand_written_references() -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 10, generator=g)
    relu = _random_sae(SAEConfig(3, 10, "relu"))
    assert torch.equal(relu.activation(z), torch.where(z > 0, z, torch.zeros_like(z)))

    jump = _random_sae(SAEConfig(3, 10, "jumprelu"))
    theta = torch.exp(jump.log_threshold.detach()).float()
    ref = torch.tensor([[v if v > t else 0.0 for v, t in zip(row.tolist(), theta.tolist(),
                                                             strict=True)] for row in z])
    assert torch.equal(jump.activation(z), ref)
    assert torch.equal(jump.threshold(), theta)

    top = _random_sae(SAEConfig(3, 10, "topk", k=3))
    ref_rows = []
    for row in z.tolist():
        keep = sorted(range(10), key=lambda i: -max(row[i], 0.0))[:3]
        ref_rows.append([max(row[i], 0.0) if i in keep else 0.0 for i in range(10)])
    assert torch.equal(top.activation(z), torch.tensor(ref_rows))
    # σ on arbitrary codes (SAS applies σ(f + λv)): encode == activation(pre_acts)
    x = torch.randn(4, 3)
    for sae in (relu, jump, top):
        assert torch.equal(sae.encode(x), sae.activation(sae.pre_acts(x)))


def test_topk_keeps_exactly_k() -> None:
    z = torch.rand(50, 40) + 0.1  # all positive: exactly k survive
    out = topk_relu(z, 7)
    assert bool(((out != 0).sum(-1) == 7).all())
    kept = torch.where(out != 0, z, torch.full_like(z, math.inf)).min(-1).values
    dropped = torch.where(out == 0, z, torch.full_like(z, -math.inf)).max(-1).values
    assert bool((kept >= dropped).all())
    sparse = torch.full((3, 40), -1.0)
    sparse[:, 0] = 2.0  # one positive: at most one non-zero (ReLU first)
    assert bool(((topk_relu(sparse, 7) != 0).sum(-1) == 1).all())


def test_jumprelu_straight_through_gradients() -> None:
    """∂σ/∂θ = −(θ/ε)K((z−θ)/ε), ∂σ/∂z = H(z−θ) (Rajamanoharan et al. 2024)."""
    cfg = SAEConfig(2, 3, "jumprelu", jumprelu_init_threshold=0.5, jumprelu_bandwidth=0.2)
    sae = SparseAutoencoder(cfg)
    z = torch.tensor([[0.45, 0.55, 0.2], [0.58, 0.9, 0.41]], requires_grad=True)
    sae.activation(z).sum().backward()
    assert z.grad is not None
    assert torch.equal(z.grad, (z.detach() > 0.5).float())
    # within the window |z − θ| < ε/2 = 0.1: column 0 has 2 hits, 1 has 1, 2 has 1
    hits = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    grad_theta = -(0.5 / 0.2) * hits
    assert sae.log_threshold.grad is not None
    torch.testing.assert_close(sae.log_threshold.grad, grad_theta * 0.5)  # chain rule: ·θ


def test_check_input_names_both_widths() -> None:
    sae = SparseAutoencoder(SAEConfig(8, 16, "relu"))
    with pytest.raises(SteeringError, match=r"d_in = 8.*width 5"):
        sae.encode(torch.zeros(3, 5))
    with pytest.raises(SteeringError, match="d_in = 8"):
        sae.check_input(torch.tensor(1.0))
    with pytest.raises(SteeringError, match="d_sae = 16"):
        sae.decode(torch.zeros(3, 8))
    with pytest.raises(SteeringError, match="d_sae = 16"):
        sae.activation(torch.zeros(3, 8))
    with pytest.raises(SteeringError, match="no threshold"):
        sae.threshold()


def test_normalize_decoder_and_tied_decoder() -> None:
    sae = _random_sae(SAEConfig(6, 12, "relu"))
    before = sae.W_enc.detach().clone()
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(12))
    assert torch.equal(sae.W_enc, before)  # the encoder is not touched

    tied = _random_sae(SAEConfig(6, 12, "topk", k=2, tied=True))
    assert "W_dec" not in dict(tied.named_parameters())
    assert torch.equal(tied.W_dec, tied.W_enc.T)
    assert torch.equal(tied.decoder_weight(), tied.W_enc.T)
    tied.normalize_decoder_()
    torch.testing.assert_close(tied.decoder_weight().norm(dim=1), torch.ones(12))
    x = torch.randn(3, 6)
    torch.testing.assert_close(tied(x), tied.encode(x) @ tied.W_enc.T + tied.b_dec)


def test_state_dict_round_trip_as_sas_artifacts_do() -> None:
    for cfg in (SAEConfig(4, 8, "jumprelu"), SAEConfig(4, 8, "topk", k=2, tied=True)):
        sae = _random_sae(cfg)
        other = SparseAutoencoder(SAEConfig(**asdict(sae.config)))
        other.load_state_dict(sae.state_dict(), strict=True)
        x = torch.randn(5, 4)
        assert torch.equal(other(x), sae(x))


# -- training ----------------------------------------------------------------------------------
def test_topk_training_low_fvu_and_recovers_directions() -> None:
    x, dirs = _synthetic()
    sae, report = train_sae(x, SAEConfig(32, 256, "topk", k=3), **FAST)
    assert isinstance(report, TrainReport)
    assert report.fvu < 0.1, report
    assert report.mean_l0 <= 3
    assert _recovered(sae, dirs) > 0.9
    assert report.tokens_seen == FAST["epochs"] * 4096
    assert report.steps == FAST["epochs"] * 16 and len(report.history) == FAST["epochs"]
    assert report.history[-1] < report.history[0]
    torch.testing.assert_close(sae.decoder_weight().norm(dim=1), torch.ones(256))
    ev = evaluate_sae(sae, x)
    assert ev["fvu"] == pytest.approx(report.fvu) and ev["n_tokens"] == 4096


def test_relu_training_low_fvu() -> None:
    x, dirs = _synthetic()
    sae, report = train_sae(x, SAEConfig(32, 256, "relu"), l1_coefficient=0.02,
                            **{**FAST, "epochs": 30})
    assert report.fvu < 0.1, report
    assert _recovered(sae, dirs) > 0.8
    assert report.train_seconds > 0 and report.eval_on == "train"


def test_jumprelu_training_trades_l0_for_fvu() -> None:
    x, _ = _synthetic()
    cfg = SAEConfig(32, 128, "jumprelu")
    loose, r_loose = train_sae(x, cfg, l0_coefficient=1e-3, **FAST)
    tight, r_tight = train_sae(x, cfg, l0_coefficient=2e-2, **FAST)
    assert r_loose.fvu < 0.15, r_loose
    assert r_tight.mean_l0 < 0.5 * r_loose.mean_l0
    assert bool((tight.threshold() > loose.threshold()).float().mean() > 0.5)


def test_eval_activations_are_used() -> None:
    x, _ = _synthetic(n=2048)
    held, _ = _synthetic(n=512, seed=0)
    _, report = train_sae(x, SAEConfig(32, 64, "topk", k=3), epochs=2, batch_size=256,
                          progress=False, eval_activations=held)
    assert report.eval_on == "eval"


def test_seeded_training_is_reproducible_and_leaves_global_rng_alone() -> None:
    x, _ = _synthetic(n=1024)
    cfg = SAEConfig(32, 64, "jumprelu")
    state = torch.get_rng_state()
    a, ra = train_sae(x, cfg, epochs=3, batch_size=128, seed=7, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b, rb = train_sae(x, cfg, epochs=3, batch_size=128, seed=7, progress=False)
    c, _ = train_sae(x, cfg, epochs=3, batch_size=128, seed=8, progress=False)
    pa, pb = _params(a), _params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert ra.history == rb.history
    assert not torch.equal(pa["W_enc"], _params(c)["W_enc"])


def test_streaming_chunks() -> None:
    x, _ = _synthetic(n=2048)
    cfg = SAEConfig(32, 128, "relu")
    kw: dict[str, Any] = {"epochs": 4, "batch_size": 256, "progress": False}
    whole, r_whole = train_sae(x, cfg, **kw)
    listed, _ = train_sae([x], cfg, **kw)
    called, _ = train_sae(lambda: iter([x]), cfg, **kw)
    pw = _params(whole)
    for other in (listed, called):
        po = _params(other)
        assert all(torch.equal(pw[k], po[k]) for k in pw)
    chunks = list(x.split(300))  # uneven chunks: batches straddle them
    streamed, r_stream = train_sae(chunks, cfg, **kw)
    assert r_stream.tokens_seen == r_whole.tokens_seen == 4 * 2048
    assert r_stream.steps == r_whole.steps == 4 * 8
    assert r_stream.fvu < 1.5 * r_whole.fvu + 0.02
    ev = evaluate_sae(streamed, chunks)
    assert ev["fvu"] == pytest.approx(evaluate_sae(streamed, x)["fvu"], rel=1e-5)


def _kill(sae: SparseAutoencoder, n: int, bias: float) -> SparseAutoencoder:
    with torch.no_grad():
        sae.b_enc[:n] = bias
    return sae


def test_resampling_revives_dead_relu_features() -> None:
    x, _ = _synthetic(n=2048)
    cfg = SAEConfig(32, 64, "relu")
    init = _kill(SparseAutoencoder(cfg), 16, -1e4)  # these can never fire
    with torch.no_grad():
        init.b_dec.copy_(x.mean(0))
    kw: dict[str, Any] = {"epochs": 6, "batch_size": 256, "progress": False, "init": init}
    _, r_dead = train_sae(x, cfg, resample=False, **kw)
    assert r_dead.dead_fraction >= 16 / 64 and r_dead.n_resampled == 0
    alive, r_alive = train_sae(x, cfg, resample=True, dead_tokens=1024, **kw)
    assert r_alive.n_resampled >= 16
    assert r_alive.dead_fraction < 0.05, r_alive
    assert bool((alive.encode(x)[:, :16] != 0).any(0).all())
    assert bool((init.b_enc[:16] == -1e4).all())  # init is not modified


def test_auxk_revives_dead_topk_features() -> None:
    x, _ = _synthetic(n=2048)
    cfg = SAEConfig(32, 64, "topk", k=3)
    # −2 in normalised units (E‖x − x̄‖² = 1): below every pre-activation
    c = math.sqrt(x.shape[0] / float(((x - x.mean(0)) ** 2).sum()))
    init = _kill(SparseAutoencoder(cfg), 32, -2.0 / c)
    with torch.no_grad():
        init.b_dec.copy_(x.mean(0))
    kw: dict[str, Any] = {"epochs": 12, "batch_size": 256, "progress": False, "init": init,
                          "dead_tokens": 512}
    _, r_off = train_sae(x, cfg, aux_coefficient=0.0, **kw)
    _, r_on = train_sae(x, cfg, **kw)
    assert r_off.dead_fraction >= 0.5  # without AuxK they stay dead
    assert r_on.dead_fraction < 0.1, r_on


@pytest.mark.parametrize("data, match", [
    (torch.zeros(0, 8), "empty"),
    (torch.ones(16, 8), "zero variance"),
    (torch.randn(16, 5), "width 5 but the SAE reads d_in = 8"),
    (torch.randint(0, 3, (16, 8)), "floating-point"),
    (torch.randn(16), r"shape \(N, 8\)"),
    ([torch.randn(16, 8), torch.tensor([[math.nan] * 8])], "chunk 1 has non-finite"),
    ([torch.randn(16, 8), torch.full((2, 8), math.inf)], "non-finite"),
    ([torch.randn(16, 8), "rows"], "is a str, not a tensor"),
    (iter([torch.randn(16, 8)]), "one-shot iterator"),
    ((t for t in [torch.randn(16, 8)]), "one-shot iterator"),
    (42, "must be an"),
    (lambda: 42, "callable must return an iterable"),
])
def test_training_data_errors(data: Any, match: str) -> None:
    with pytest.raises(DataError, match=match):
        train_sae(data, SAEConfig(8, 16, "relu"), epochs=1, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"lr": -1.0}, "lr must be a finite, positive"),
    ({"lr": math.inf}, "lr"),
    ({"l1_coefficient": -0.1}, "l1_coefficient must be a finite, non-negative"),
    ({"aux_k": 0}, "aux_k"),
    ({"dead_tokens": 0}, "dead_tokens"),
    ({"threshold_lr": 0.0}, "threshold_lr"),
    ({"seed": "a"}, "seed"),
    ({"init": SparseAutoencoder(SAEConfig(8, 32, "relu"))}, "init's config differs"),
])
def test_training_setting_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(SteeringError, match=match):
        train_sae(torch.randn(16, 8), SAEConfig(8, 16, "relu"), progress=False, **kwargs)
    with pytest.raises(SteeringError, match="SAEConfig"):
        train_sae(torch.randn(16, 8), {"d_in": 8}, progress=False)  # type: ignore[arg-type]


def test_divergence_raises_and_returns_nothing() -> None:
    x, _ = _synthetic(n=512)
    with pytest.raises(SteeringError, match=r"diverged.*lower lr"):
        train_sae(x, SAEConfig(32, 64, "relu"), lr=1e30, epochs=3, batch_size=64,
                  progress=False)


# -- SAELens format ----------------------------------------------------------------------------
CONFIGS = [
    SAEConfig(6, 12, "relu", hook_name="blocks.2.hook_resid_post", model_name="tiny"),
    SAEConfig(6, 12, "jumprelu", site="resid_post.3", jumprelu_bandwidth=0.01),
    SAEConfig(6, 12, "topk", k=4, apply_b_dec_to_input=False),
    SAEConfig(6, 12, "topk", k=3, tied=True, site="resid_pre.1"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["relu", "jumprelu", "topk", "topk-tied"])
def test_saelens_round_trip_is_exact(cfg: SAEConfig, tmp_path: Path) -> None:
    sae = _random_sae(cfg)
    sae.train_report = {"fvu": 0.1, "history": [1.0, 0.5]}
    folder = save_saelens(sae, tmp_path / "sae")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    back = load_saelens(folder)
    assert back.config == cfg
    for name in ("W_enc", "b_enc", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
    assert torch.equal(back.decoder_weight(), sae.decoder_weight())
    if cfg.architecture == "jumprelu":
        assert torch.equal(back.threshold(), sae.threshold())
    x = torch.randn(9, 6) * 3
    assert torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back(x), sae(x))
    assert back.train_report == sae.train_report
    # a second save of the loaded SAE writes the same tensors
    again = load_file(str(save_saelens(back, tmp_path / "again") / "sae_weights.safetensors"))
    first = load_file(str(folder / "sae_weights.safetensors"))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_saelens_cfg_layout(tmp_path: Path) -> None:
    sae = _random_sae(SAEConfig(6, 12, "topk", k=4, hook_name="blocks.5.hook_resid_post",
                                model_name="gpt2"))
    folder = save_saelens(sae, tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4
    assert (cfg["d_in"], cfg["d_sae"]) == (6, 12)
    assert cfg["dtype"] == "float32" and cfg["device"] == "cpu"
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"] == {"model_name": "gpt2", "hook_name": "blocks.5.hook_resid_post"}
    assert cfg["hook_name"] == "blocks.5.hook_resid_post"
    assert cfg["steerlab"]["site"] == "resid_post.5" and cfg["steerlab"]["tied"] is False
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    assert sorted(tensors) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    assert all(t.dtype == torch.float32 for t in tensors.values())
    relu = json.loads((save_saelens(_random_sae(SAEConfig(6, 12, "relu")),
                                    tmp_path / "r") / "cfg.json").read_text())
    assert relu["architecture"] == "standard" and "k" not in relu
    jump = load_file(str(save_saelens(_random_sae(SAEConfig(6, 12, "jumprelu")),
                                      tmp_path / "j") / "sae_weights.safetensors"))
    assert sorted(jump) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]


def test_trained_sae_round_trip_keeps_report(tmp_path: Path) -> None:
    x, _ = _synthetic(n=512)
    sae, report = train_sae(x, SAEConfig(32, 64, "jumprelu", site="resid_post.4"), epochs=2,
                            batch_size=128, progress=False)
    back = load_saelens(save_saelens(sae, tmp_path / "sae"))
    assert back.train_report == report.to_dict()
    assert torch.equal(back.encode(x), sae.encode(x))


def _write_folder(folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(folder / "sae_weights.safetensors"))
    return folder


def _weights(d: int, m: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d, m, generator=g), "b_enc": torch.randn(m, generator=g),
            "W_dec": torch.randn(m, d, generator=g), "b_dec": torch.randn(d, generator=g)}


def test_load_handwritten_standard_folder(tmp_path: Path) -> None:
    """SAELens ≥ 6 layout: LM details in metadata, architecture "standard"."""
    w = _weights(8, 16)
    cfg = {"architecture": "standard", "d_in": 8, "d_sae": 16, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post",
                        "sae_lens_version": "6.18.0"}}
    sae = load_saelens(_write_folder(tmp_path / "s", cfg, w))
    assert sae.config.architecture == "relu" and sae.config.site == "resid_post.3"
    assert sae.config.model_name == "gpt2" and not sae.config.tied
    x = torch.randn(5, 8)
    ref = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(sae(x), ref)


def test_load_handwritten_pre6_topk_folder(tmp_path: Path) -> None:
    """SAELens < 6 layout: hook_point, activation_fn topk with activation_fn_kwargs.k."""
    w = _weights(8, 16)
    w["scaling_factor"] = torch.ones(16)
    cfg = {"d_in": 8, "d_sae": 16, "dtype": "float32", "device": "cpu",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
           "hook_point": "blocks.1.hook_resid_pre", "model_name": "pythia-70m",
           "normalize_activations": False, "finetuning_scaling_factor": False}
    sae = load_saelens(_write_folder(tmp_path / "t", cfg, w))
    assert sae.config.architecture == "topk" and sae.config.k == 4
    assert sae.config.hook_name == "blocks.1.hook_resid_pre"
    assert sae.config.site == "resid_pre.1"
    x = torch.randn(5, 8)
    assert bool(((sae.encode(x) != 0).sum(-1) <= 4).all())


def test_load_jumprelu_with_non_positive_thresholds(tmp_path: Path) -> None:
    """SAELens computes ReLU(z)·H(z − θ): a threshold ≤ 0 acts as 0."""
    w = _weights(8, 16)
    theta = torch.rand(16) * 0.5
    theta[:3] = torch.tensor([0.0, -0.2, -5.0])
    w["threshold"] = theta
    cfg = {"architecture": "jumprelu", "d_in": 8, "d_sae": 16, "hook_name": "x"}
    sae = load_saelens(_write_folder(tmp_path / "j", cfg, w))
    x = torch.randn(20, 8)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    ref = torch.relu(pre) * (pre > theta)
    assert torch.equal(sae.encode(x), ref)
    assert torch.equal(sae.threshold()[3:], theta[3:])
    assert bool((sae.threshold()[:3] == 0).all())


def test_load_topk_folds_decoder_norm_rescaling(tmp_path: Path) -> None:
    w = _weights(8, 16)
    cfg = {"architecture": "topk", "k": 3, "d_in": 8, "d_sae": 16,
           "rescale_acts_by_decoder_norm": True}
    sae = load_saelens(_write_folder(tmp_path / "t", cfg, w))
    x = torch.randn(10, 8)
    norms = w["W_dec"].norm(dim=1)
    pre = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms  # SAELens TopKSAE.encode
    codes = topk_relu(pre, 3)
    torch.testing.assert_close(sae.encode(x), codes)
    torch.testing.assert_close(sae(x), (codes / norms) @ w["W_dec"] + w["b_dec"])


def test_save_into_existing_folder_keeps_other_files(tmp_path: Path) -> None:
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / "sparsity.safetensors").write_bytes(b"x")
    save_saelens(_random_sae(SAEConfig(4, 8, "relu")), folder)
    assert (folder / "sparsity.safetensors").read_bytes() == b"x"
    assert load_saelens(folder).config.d_sae == 8
    with pytest.raises(ArtifactError, match="not a folder"):
        save_saelens(_random_sae(SAEConfig(4, 8, "relu")), folder / "sparsity.safetensors")


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import steerlab.sae as sae_module

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(sae_module, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_saelens(_random_sae(SAEConfig(4, 8, "relu")), tmp_path / "sae")
    assert list(tmp_path.iterdir()) == []


def _good(tmp_path: Path, name: str = "sae") -> Path:
    return save_saelens(_random_sae(SAEConfig(4, 8, "jumprelu")), tmp_path / name)


def _edit_cfg(folder: Path, **changes: Any) -> Path:
    cfg = json.loads((folder / "cfg.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _edit_weights(folder: Path, **changes: Any) -> Path:
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    for key, value in changes.items():
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder


BAD_FOLDERS: list[tuple[str, Any, str]] = [
    ("missing folder", lambda p: p / "nowhere", "does not exist"),
    ("a file", lambda p: _good(p) / "cfg.json", "is not a folder"),
    ("no cfg", lambda p: _unlink(_good(p), "cfg.json"), r"cfg\.json is missing"),
    ("no weights", lambda p: _unlink(_good(p), "sae_weights.safetensors"),
     r"sae_weights\.safetensors is missing"),
    ("bad json", lambda p: _write_text(_good(p), "cfg.json", "{not json"), "cannot parse"),
    ("json list", lambda p: _write_text(_good(p), "cfg.json", "[1, 2]"), "JSON object"),
    ("no d_in", lambda p: _edit_cfg(_good(p), d_in=None), "missing key 'd_in'"),
    ("bad d_sae", lambda p: _edit_cfg(_good(p), d_sae="8"), "d_sae must be a positive"),
    ("gated", lambda p: _edit_cfg(_good(p), architecture="gated"),
     "'gated' is not supported; steerlab loads 'standard' \\(relu\\), 'jumprelu'"),
    ("transcoder", lambda p: _edit_cfg(_good(p), architecture="jumprelu_transcoder"),
     "not supported"),
    ("normalised", lambda p: _edit_cfg(_good(p), normalize_activations="expected_average_only_in"),
     "normalize_activations is 'expected_average_only_in'.*raw activations"),
    ("normalised bool", lambda p: _edit_cfg(_good(p), normalize_activations=True),
     "normalize_activations"),
    ("hook_z", lambda p: _edit_cfg(_good(p), reshape_activations="hook_z"), "hook_z"),
    ("topk no k", lambda p: _edit_cfg(_good(p), architecture="topk"), "integer k"),
    ("topk two k", lambda p: _edit_cfg(_good(p), architecture="topk", k=2,
                                       activation_fn_kwargs={"k": 3}), "k = 2 but"),
    ("tanh relu", lambda p: _edit_cfg(_good(p), architecture="standard",
                                      activation_fn="tanh-relu"), "tanh-relu"),
    ("arch clash", lambda p: _edit_cfg(_good(p), architecture="standard"),
     "steerlab.architecture"),
    ("bad steerlab", lambda p: _edit_cfg(_good(p), steerlab=[1]), "'steerlab' entry"),
    ("bad tied", lambda p: _edit_cfg(_good(p), steerlab={"tied": "yes"}), "tied must be"),
    ("no threshold", lambda p: _edit_weights(_good(p), threshold=None),
     "missing tensor\\(s\\) threshold"),
    ("extra tensor", lambda p: _edit_weights(_good(p), b_gate=torch.zeros(8)),
     "unexpected tensor\\(s\\) b_gate"),
    ("scaling factor", lambda p: _edit_weights(_good(p), scaling_factor=torch.full((8,), 2.0)),
     "scaling_factor"),
    ("shape", lambda p: _edit_weights(_good(p), W_enc=torch.zeros(4, 9)),
     r"W_enc has shape \(4, 9\) but cfg.json \(d_in = 4, d_sae = 8\) needs \(4, 8\)"),
    ("shape vs cfg", lambda p: _edit_cfg(_good(p), d_sae=9), "has shape"),
    ("nan", lambda p: _edit_weights(_good(p), b_dec=torch.tensor([0.0, math.nan, 0, 0])),
     "b_dec has non-finite"),
    ("inf threshold", lambda p: _edit_weights(_good(p), threshold=torch.full((8,), math.inf)),
     "threshold has non-finite"),
    ("int tensor", lambda p: _edit_weights(_good(p), b_enc=torch.zeros(8, dtype=torch.int32)),
     "floating point"),
    ("not safetensors", lambda p: _write_text(_good(p), "sae_weights.safetensors", "pickle"),
     "cannot read"),
    ("tied mismatch", lambda p: _edit_cfg(_good(p), steerlab={"tied": True}), "not W_enc"),
]


def _unlink(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def _write_text(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("make, match", [(m, r) for _, m, r in BAD_FOLDERS],
                         ids=[n for n, _, _ in BAD_FOLDERS])
def test_load_errors(make: Any, match: str, tmp_path: Path) -> None:
    folder = make(tmp_path)
    with pytest.raises(ArtifactError, match=match) as info:
        load_saelens(folder)
    assert str(folder.name) in str(info.value)


def test_save_refuses_non_finite_weights(tmp_path: Path) -> None:
    sae = _random_sae(SAEConfig(4, 8, "relu"))
    with torch.no_grad():
        sae.b_enc[0] = math.nan
    with pytest.raises(ArtifactError, match="non-finite"):
        save_saelens(sae, tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


def _chunks_of(x: torch.Tensor) -> Iterator[torch.Tensor]:
    yield from x.split(100)


def test_evaluate_sae_matches_direct_computation() -> None:
    sae = _random_sae(SAEConfig(6, 12, "relu"))
    x = torch.randn(250, 6) * 2 + 1
    ev = evaluate_sae(sae, lambda: _chunks_of(x))
    x_hat = sae(x).detach()
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    codes = sae.encode(x)
    assert ev["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert ev["mean_l0"] == pytest.approx(float((codes != 0).sum(-1).float().mean()))
    assert ev["dead_fraction"] == float(((codes != 0).sum(0) == 0).float().mean())
    assert ev["n_tokens"] == 250

"""A-LQR, A-LQR+, multi-concept A-LQR, ActAdd-LFS and S-PID inside real (tiny) models, beside
a slow, literal transcription of the reference code.

Reference: trustworthyrobotics/lqr-activation-steering at c2e0c845 (code last changed in
a324afa). Everything in the ``ref_*`` helpers below is written from that code, not from
steerlab's: the LFS collection (``steer/data_handling.py`` ``collect_data_batch``
L228-276), the Riccati solver (``steer/lqr_utils.py`` ``time_varying_lqr_noB_mem_efficient``
L162-198), the A-LQR / A-LQR+ hooks and their set-up (``steer/steering.py``
``hook_setpoint_tracking`` L194-243, ``track_setpoint`` L398-453), the multi-concept hook
(``hook_multisteer_tracking`` L261-282, ``multisteer`` L456-535), and the PID hooks
(``steer/PIDsteering.py`` ``hook_setpoint_tracking`` L166-196, ``track_setpoint_actadd``
L286-341, ``track_setpoint`` L344-406).

Two pieces of plumbing are not the reference's: the hooks take the block input from the
keyword ``hidden_states`` when the model passes it by name (transformers 5 passes it
positionally for the models used here, so ``input[0]`` is what runs), and the block
Jacobians A are steerlab's (their equality with a full-sequence reverse-mode reference is
tested in ``test_jacobians.py``); the Riccati on them is the reference's.

Each test compares greedy tokens (equal) and the logits of every decode step (relative
difference ≤ 1e-5) over 5 new tokens, on two architectures, and checks that the steering
changes the logits, so the comparison can fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from steerlab.data import LabeledSet, LabeledText
from steerlab.fitting import fit_alqr, fit_lfs_baseline
from steerlab.methods import ALQR, SPID, ActAddLFS, ALQRPlus
from steerlab.models import LoadedModel
from steerlab.runtime import Steer, steering, tokenize_prompts
from tiny_models import build_tiny_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ARCHS = ["llama", "qwen2"]
NEW = 5
# Unpaired D+ / D− prompt sets, as in the paper; every text ends in "." so block 0 (the
# embedding of the last token) is degenerate (μ_0 = 0) and gets no control.
POS = ["the day was bright and warm.", "we loved every minute of it.",
       "a kind and gentle friend came.", "the food was wonderful.",
       "what a happy song.", "she smiled at the sun."]
NEG = ["the day was grim and cold.", "we hated every minute of it.",
       "a cruel and bitter enemy came.", "the food was awful.",
       "what a sad dirge.", "she wept in the rain."]
POS2 = ["the ball flew into the goal.", "the team scored twice.", "a striker ran fast.",
        "the match ended in a draw.", "fans sang for the club.", "he kicked the ball."]
PROMPTS = ["I think that the", "Today", "the house by the river was"]  # a padded batch


def labelled(pos: list[str], neg: list[str], name: str) -> LabeledSet:
    return LabeledSet([LabeledText(t, 1) for t in pos] + [LabeledText(t, 0) for t in neg],
                      name=name)


SET1 = labelled(POS, NEG, "sentiment")
SET2 = labelled(POS2, NEG, "football")


def block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def hooks_on_layers(model: Any, fn: Any, layer_inds: list[int] | None = None) -> Iterator[None]:
    """``register_*_hooks`` of the reference: one forward hook per ``model.model.layers[i]``
    closed over the layer index; removed in ``__exit__`` (reference ``remove_hooks``)."""
    layers = model.model.layers
    inds = list(range(len(layers))) if layer_inds is None else layer_inds
    handles = [layers[i].register_forward_hook(
        lambda m, a, kw, o, i=i: fn(i, block_input(a, kw), o), with_kwargs=True)
        for i in inds]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def ref_contrast(lm: LoadedModel, positive: list[str], negative: list[str]) -> torch.Tensor:
    """``X_contr = X - X_tox`` (steer/tox_eval.py L33) from ``collect_data_batch``
    (data_handling.py L228-276): per class, hooks store every block input ``input[0]`` (and
    the last block's output) of one ``generate(max_new_tokens=1, use_cache=False)`` pass,
    ``X_sum += sum(X[:, :, -1, :], dim=1)``, ``X_mean = X_sum / len(samples)``."""
    model, tok = lm.model, lm.tokenizer
    T = len(model.model.layers)

    def mean(texts: list[str]) -> torch.Tensor:
        tok.padding_side = "left"
        inputs = tok(texts, return_tensors="pt", padding=True, truncation=True)
        B, L = inputs["input_ids"].shape
        X = torch.zeros(T + 1, B, L, lm.info.hidden_size)

        def collector(i: int, x: torch.Tensor, output: Any) -> Any:
            X[i] = x
            if i == T - 1:
                X[T] = output[0] if isinstance(output, tuple) else output
            return output

        with torch.no_grad(), hooks_on_layers(model, collector):
            model.generate(input_ids=inputs["input_ids"],
                           attention_mask=inputs["attention_mask"].float(), max_new_tokens=1,
                           do_sample=False, use_cache=False, pad_token_id=tok.eos_token_id)
        return torch.sum(X[:, :, -1, :], dim=1) / len(texts)

    return mean(positive) - mean(negative)


def ref_gains(A: torch.Tensor, q: float, r: float, qf: float) -> torch.Tensor:
    """``time_varying_lqr_noB_mem_efficient`` (lqr_utils.py L162-198) with
    ``Q = q·I``, ``R = r·I``, ``Qf = qf·I`` (steering.py L54-56)."""
    T, n, m = A.shape
    Q = torch.eye(n).unsqueeze(0).repeat(T, 1, 1) * q
    R = torch.eye(n).unsqueeze(0).repeat(T, 1, 1) * r
    S = torch.zeros((T + 1, n, n), dtype=A.dtype)
    K = torch.zeros((T, m, n), dtype=A.dtype)
    S[T] = torch.eye(n) * qf
    for t in reversed(range(T)):
        At, Qt, Rt, Stp1 = A[t], Q[t], R[t], S[t + 1]
        P = Stp1 + Rt
        F = Stp1 @ At
        G = Qt + At.transpose(-2, -1) @ Stp1 @ At
        K[t] = torch.linalg.solve(P, F)
        S[t] = G - F.transpose(-2, -1) @ torch.linalg.solve(P, F)
    return K


def ref_setpoint(E: torch.Tensor, lmbda: float, threshold_zero: bool) -> tuple[torch.Tensor,
                                                                            list[Any]]:
    """``E_unit`` and ``betas``: steering.py L428-436 (``nrm == 0`` → no control) or
    PIDsteering.py L375-385 (``nrm < 1e-6`` → E_unit 0, betas still λ·nrm)."""
    E_unit = torch.zeros_like(E)
    betas: list[Any] = [0 for _ in range(E.shape[0])]
    for i, e in enumerate(E):
        nrm = torch.linalg.norm(e)
        if (nrm == 0) if threshold_zero else (nrm < 1e-6):
            E_unit[i] = E_unit[i] * 0
            if not threshold_zero:
                betas[i] = lmbda * nrm
        else:
            E_unit[i] = e / nrm
            betas[i] = lmbda * nrm
    return E_unit, betas


def ref_lqr_hook(K: torch.Tensor, E_unit: torch.Tensor, betas: list[Any],
                 all_tokens: bool) -> Any:
    """``LQRSteering.hook_setpoint_tracking`` (steering.py L194-243), linear setpoint."""

    def hook(layer_idx: int, x_in: torch.Tensor, output: Any) -> Any:
        if all_tokens:
            x = x_in
            v = E_unit[layer_idx]
            b_mat = betas[layer_idx] * torch.ones([x.shape[0], x.shape[1]])
            probe_mat = x @ v.T
            alpha = b_mat - probe_mat
            v_mat = v.expand(x.shape[0], x.shape[1], -1)
            e = alpha.unsqueeze(-1) * v_mat
            u_t = e @ K[layer_idx].T
            if isinstance(output, tuple):
                output[0][...] = output[0] + u_t
            else:
                output = output + u_t
            return output
        x = x_in[:, -1, :]
        v = E_unit[layer_idx]
        alpha = torch.tensor([betas[layer_idx] for i in range(x.shape[0])]) - torch.bmm(
            v.unsqueeze(0).unsqueeze(0), torch.transpose(x.unsqueeze(0), -2, -1))
        e = alpha.squeeze(0).T @ v.unsqueeze(0)
        u_t = torch.bmm(K[layer_idx].unsqueeze(0),
                        torch.transpose(e.unsqueeze(0), -2, -1)).squeeze(0).T
        if isinstance(output, tuple):
            output[0][..., -1, :] = output[0][..., -1, :] + u_t
        else:
            output[..., -1, :] = output[..., -1, :] + u_t
        return output

    return hook


def ref_multisteer_hook(K: torch.Tensor, sp1: tuple[torch.Tensor, list[Any]],
                        sp2: tuple[torch.Tensor, list[Any]]) -> Any:
    """``hook_multisteer_tracking`` (steering.py L261-282): u = K e + K e_alt."""
    (E_unit, betas), (E_alt_unit, betas_alt) = sp1, sp2

    def hook(layer_idx: int, x_in: torch.Tensor, output: Any) -> Any:
        x = x_in[:, -1, :]
        v, v_alt = E_unit[layer_idx], E_alt_unit[layer_idx]
        alpha = torch.tensor([betas[layer_idx] for i in range(x.shape[0])]) - torch.bmm(
            v.unsqueeze(0).unsqueeze(0), torch.transpose(x.unsqueeze(0), -2, -1))
        alpha_alt = torch.tensor([betas_alt[layer_idx] for i in range(x.shape[0])]) - \
            torch.bmm(v_alt.unsqueeze(0).unsqueeze(0), torch.transpose(x.unsqueeze(0), -2, -1))
        e = alpha.squeeze(0).T @ v.unsqueeze(0)
        e_alt = alpha_alt.squeeze(0).T @ v_alt.unsqueeze(0)
        u_t = torch.bmm(K[layer_idx].unsqueeze(0),
                        torch.transpose(e.unsqueeze(0), -2, -1)).squeeze(0).T
        u_t_alt = torch.bmm(K[layer_idx].unsqueeze(0),
                            torch.transpose(e_alt.unsqueeze(0), -2, -1)).squeeze(0).T
        if isinstance(output, tuple):
            output[0][..., -1, :] = output[0][..., -1, :] + u_t + u_t_alt
        else:
            output[..., -1, :] = output[..., -1, :] + u_t + u_t_alt
        return output

    return hook


class RefPID:
    """``PIDSteering`` state and ``hook_setpoint_tracking`` (PIDsteering.py L166-196):
    ``e_sum``/``e_prev`` are (B, d) zeros set per generate call (L371-372), shared across
    layers *and* forward passes; ``e_sum += e`` then zeroed at ``layer_idx % 10 == 0``."""

    def __init__(self, kp: float, ki: float, kd: float, E_unit: torch.Tensor,
                 betas: list[Any], batch: int) -> None:
        self.Kp, self.Ki, self.Kd = kp, ki, kd
        self.E_unit, self.betas = E_unit, betas
        self.e_sum = torch.zeros((batch, E_unit.shape[1]))
        self.e_prev = torch.zeros((batch, E_unit.shape[1]))

    def hook(self, layer_idx: int, x_in: torch.Tensor, output: Any) -> Any:
        x = x_in[:, -1, :]
        v = self.E_unit[layer_idx].to(x.dtype)
        alpha = torch.tensor([self.betas[layer_idx] for i in range(x.shape[0])],
                             dtype=x.dtype) - torch.bmm(
            v.unsqueeze(0).unsqueeze(0), torch.transpose(x.unsqueeze(0), -2, -1))
        e = alpha.squeeze(0).T @ v.unsqueeze(0)
        self.e_sum += e
        if layer_idx % 10 == 0:
            self.e_sum = self.e_sum * 0
        u_t = self.Kp * e + self.Ki * self.e_sum + self.Kd * (e - self.e_prev)
        self.e_prev = e
        if isinstance(output, tuple):
            output[0][..., -1, :] = output[0][..., -1, :] + u_t
        else:
            output[..., -1, :] = output[..., -1, :] + u_t
        return output


GEN_KW: dict[str, Any] = {"max_new_tokens": NEW, "do_sample": False, "temperature": None,
                          "top_p": None, "top_k": None, "use_cache": True,
                          "return_dict_in_generate": True, "output_logits": True}


def run_generate(lm: LoadedModel, ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generation of PROMPTS (left-padded batch) under ``ctx``: tokens and the
    logits of every step, (steps, B, V)."""
    enc = tokenize_prompts(lm, PROMPTS, rendered=False)
    with torch.no_grad(), ctx:
        out = lm.model.generate(**enc, pad_token_id=lm.tokenizer.eos_token_id, **GEN_KW)
    return out.sequences, torch.stack(out.logits)


def assert_same(lm: LoadedModel, ours: Any, ref: Any) -> None:
    seq_ours, log_ours = run_generate(lm, ours)
    seq_ref, log_ref = run_generate(lm, ref)
    _, log_plain = run_generate(lm, contextlib_null())
    scale = log_ref.abs().max()
    assert (log_ref - log_plain).abs().max() > 1e-2 * scale, "the steering did nothing"
    assert torch.equal(seq_ours, seq_ref)
    rel = float((log_ours - log_ref).abs().max() / scale)
    assert rel <= 1e-5, rel


@contextmanager
def contextlib_null() -> Iterator[None]:
    yield


@contextmanager
def ref_steering(model: Any, hook: Any, layer_inds: list[int] | None = None) -> Iterator[None]:
    with hooks_on_layers(model, hook, layer_inds):
        yield


@pytest.fixture(scope="module", params=ARCHS)
def lm(request: pytest.FixtureRequest) -> LoadedModel:
    return build_tiny_model(request.param, seed=3, num_layers=4)


@pytest.fixture(scope="module", params=ARCHS)
def lm12(request: pytest.FixtureRequest) -> LoadedModel:
    """12 blocks, so S-PID's integral is reset inside the pass (at 0 and 10)."""
    return build_tiny_model(request.param, seed=4, num_layers=12)


def test_reference_lfs_equals_ours_and_block0_is_degenerate(lm: LoadedModel) -> None:
    """The LFS of a labelled set at the last token equals the reference collection
    (data_handling.py L228-276); every text ends in ".", so μ_0 = 0 and v_0 = 0 (the
    reference's ``nrm == 0`` branch, steering.py L432-433)."""
    with pytest.warns(UserWarning, match=r"block input\(s\) \[0\]"):
        c = fit_lfs_baseline(lm, SET1, SPID(), cache=False, progress=False)
    E = ref_contrast(lm, POS, NEG)
    E_unit, betas = ref_setpoint(E, 1.0, threshold_zero=True)
    assert float(E[0].norm()) == 0.0 and float(c.mu[0, 0]) == 0.0
    assert torch.equal(c.v[0, 0], torch.zeros(lm.info.hidden_size))
    torch.testing.assert_close(c.v[0], E_unit[:-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.mu[0], torch.stack([torch.as_tensor(b, dtype=torch.float32)
                                                     for b in betas[:-1]]),
                               rtol=1e-5, atol=1e-6)
    assert c.fit_info["data"] == "sentiment"


@pytest.mark.parametrize("plus", [False, True])
def test_alqr_matches_reference_hooks(lm: LoadedModel, plus: bool) -> None:
    """A-LQR (``track_setpoint(all_tokens=False)``) and A-LQR+ (``all_tokens=True``, steering
    every position of a left-padded batch; the reference also steers the padding, which
    attention masks out, so real tokens must agree) at λ = 1.5 with the Gemma-2-2B costs
    (tox_eval.py L120-123)."""
    cls = ALQRPlus if plus else ALQR
    with pytest.warns(UserWarning, match="coincide"):
        c = fit_alqr(lm, SET1, cls(q=0.1, r=3.0, q_f=0.1, lambdas=1.5, n_jacobian_prompts=6,
                                   max_tokens=24), cache=False, progress=False)
    assert c.recipe == "last" and c.A is not None
    K = ref_gains(c.A, 0.1, 3.0, 0.1)
    E_unit, betas = ref_setpoint(ref_contrast(lm, POS, NEG), 1.5, threshold_zero=True)
    assert_same(lm, steering(lm, Steer(c, 1.0)),
                ref_steering(lm.model, ref_lqr_hook(K, E_unit, betas, all_tokens=plus)))


def test_multi_concept_alqr_matches_reference_multisteer(lm: LoadedModel) -> None:
    """Two concepts sharing K with their own λ (``multisteer``, steering.py L456-535)."""
    with pytest.warns(UserWarning, match="coincide"):
        c = fit_alqr(lm, [SET1, SET2], ALQR(lambdas=[1.0, 2.0], n_jacobian_prompts=6),
                     cache=False, progress=False)
    assert c.A is not None
    K = ref_gains(c.A, c.q, c.r, c.q_f)
    sp1 = ref_setpoint(ref_contrast(lm, POS, NEG), 1.0, threshold_zero=True)
    sp2 = ref_setpoint(ref_contrast(lm, POS2, NEG), 2.0, threshold_zero=True)
    assert_same(lm, steering(lm, Steer(c, 1.0)),
                ref_steering(lm.model, ref_multisteer_hook(K, sp1, sp2)))


def test_actadd_lfs_matches_reference(lm: LoadedModel) -> None:
    """``track_setpoint_actadd`` (PIDsteering.py L286-341): Ki = Kd = 0, P-control at
    ``layer_inds`` only, λ = 2."""
    with pytest.warns(UserWarning, match="coincide"):
        c = fit_lfs_baseline(lm, SET1, ActAddLFS(layers=[1, 2], kp=0.7, lambdas=2.0),
                             cache=False, progress=False)
    E_unit, betas = ref_setpoint(ref_contrast(lm, POS, NEG), 2.0, threshold_zero=False)
    ref = RefPID(0.7, 0.0, 0.0, E_unit, betas, batch=len(PROMPTS))
    assert_same(lm, steering(lm, Steer(c, 1.0)), ref_steering(lm.model, ref.hook, [1, 2]))


@pytest.mark.parametrize("gains", [(0.7, 0.01, 0.1), (0.5, 0.3, 0.4)])
def test_spid_matches_reference(lm12: LoadedModel, gains: tuple[float, float, float]) -> None:
    """S-PID ``track_setpoint`` (PIDsteering.py L344-406) with the paper's Gemma-2-2B gains
    (0.7, 0.01, 0.1) and with larger ones: the integral zeroed at reset layers (L172-175) and
    the derivative at block 0 using the previous pass's e_{L−1} (``self.e_prev`` lives across
    decode steps, L177-179), per row of a padded batch."""
    kp, ki, kd = gains
    with pytest.warns(UserWarning, match="coincide"):
        c = fit_lfs_baseline(lm12, SET1, SPID(kp=kp, ki=ki, kd=kd, lambdas=1.0), cache=False,
                             progress=False)
    E_unit, betas = ref_setpoint(ref_contrast(lm12, POS, NEG), 1.0, threshold_zero=False)
    ref = RefPID(kp, ki, kd, E_unit, betas, batch=len(PROMPTS))
    assert_same(lm12, steering(lm12, Steer(c, 1.0)), ref_steering(lm12.model, ref.hook))
    # the carried state is per context: a second generate call starts again from zeros
    ref2 = RefPID(kp, ki, kd, E_unit, betas, batch=len(PROMPTS))
    assert_same(lm12, steering(lm12, Steer(c, 1.0)), ref_steering(lm12.model, ref2.hook))


def test_spid_state_is_per_row() -> None:
    """A row's S-PID output does not depend on what shares its batch (the carried error is
    per row), and one generate call leaves nothing for the next."""
    lm = build_tiny_model("llama", seed=5, num_layers=12)
    with pytest.warns(UserWarning, match="coincide"):
        c = fit_lfs_baseline(lm, SET1, SPID(kp=0.5, ki=0.3, kd=0.4), cache=False,
                             progress=False)
    from steerlab.runtime import generate

    batch = generate(lm, PROMPTS, rows=[[Steer(c, 1.0)], [], [Steer(c, 2.0)]],
                     max_new_tokens=NEW, render=False)
    alone = [generate(lm, [PROMPTS[0]], steers=Steer(c, 1.0), max_new_tokens=NEW,
                      render=False)[0],
             generate(lm, [PROMPTS[1]], max_new_tokens=NEW, render=False)[0],
             generate(lm, [PROMPTS[2]], steers=Steer(c, 2.0), max_new_tokens=NEW,
                      render=False)[0]]
    assert batch == alone


@pytest.mark.parametrize("method", ["alqr", "alqr_plus", "spid", "actadd_lfs"])
def test_every_lfs_method_fits_a_labelled_set_by_name(method: str) -> None:
    """``fit_method(lm, name, LabeledSet)`` (it used to crash with AttributeError), with the
    reference's last-token recipe; ``preset="paper"`` where the method has one."""
    from steerlab.fitting import fit_method
    from steerlab.methods import METHODS

    lm = build_tiny_model("llama", seed=6, num_layers=4)
    hp: dict[str, Any] = {"n_jacobian_prompts": 3} if method.startswith("alqr") else {}
    if method == "actadd_lfs":
        hp["layers"] = [1]
    with pytest.warns(UserWarning, match="coincide"):
        c = fit_method(lm, method, SET1, **hp)
    assert c.recipe == "last" and c.fit_info["data"] == "sentiment"
    if "paper" in METHODS[method].presets:
        with pytest.warns(UserWarning, match="coincide"):
            p = fit_method(lm, method, SET1, preset="paper")
        want = METHODS[method].presets["paper"].hyperparameters
        got = p.hyperparameters()
        assert all(got[k] == (v if k != "lambdas" else [v]) for k, v in want.items())
        assert p.fit_info["preset"]["name"] == "paper"
    with pytest.raises(Exception, match="recipe"):
        fit_method(lm, method, SET1, recipe="mean", **hp)

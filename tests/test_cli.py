"""The CLI end to end on a tiny model saved to a folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from steerlab.cli import app
from tiny_models import save_tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("qwen2", 2, tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [
        {"prompt": "How was it?", "positive": "Great and lovely.", "negative": "Awful, sad."},
        {"prompt": "The food?", "positive": "Delicious.", "negative": "Bland and cold."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_fit_inspect_generate_export(folder: Path, data: Path, tmp_path: Path) -> None:
    art = tmp_path / "v.safetensors"
    r = runner.invoke(app, ["fit", "--model", str(folder), "--data", str(data), "--layers", "1",
                            "--out", str(art)])
    assert r.exit_code == 0, r.output
    assert art.is_file()
    r = runner.invoke(app, ["inspect", str(art)])
    assert r.exit_code == 0 and "caa" in r.output and "resid_post.1" in r.output
    r = runner.invoke(app, ["generate", "hello", "--model", str(folder), "--steer", str(art),
                            "--strength", "4", "--max-new-tokens", "4", "--compare"])
    assert r.exit_code == 0, r.output
    assert "unsteered" in r.output and "steered" in r.output
    gguf = tmp_path / "v.gguf"
    r = runner.invoke(app, ["export-gguf", str(art), str(gguf)])
    assert r.exit_code == 0 and gguf.is_file(), r.output
    back = tmp_path / "back.safetensors"
    r = runner.invoke(app, ["import-gguf", str(gguf), str(back), "--model", str(folder)])
    assert r.exit_code == 0 and back.is_file(), r.output


def test_actadd_fit(folder: Path, tmp_path: Path) -> None:
    art = tmp_path / "a.safetensors"
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", "actadd", "--layers", "1",
                            "--out", str(art)])
    assert r.exit_code == 0, r.output


def test_errors_exit_2_with_message(folder: Path, data: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["fit", "--model", str(folder), "--data", str(data), "--layers", "9",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "out of range" in r.output
    assert not list(tmp_path.iterdir())
    r = runner.invoke(app, ["inspect", str(tmp_path / "none.safetensors")])
    assert r.exit_code == 2 and "not found" in r.output
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", "magic", "--out",
                            str(tmp_path / "y")])
    assert r.exit_code == 2 and "unknown method" in r.output


def test_models_lists_embedded() -> None:
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0 and "smollm2-135m" in r.output and "gemma3-270m" in r.output


def test_diagnose_alqr_writes_figures(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "diag"
    r = runner.invoke(app, ["diagnose", "alqr", "--model", str(folder), "--out", str(out),
                            "--prompts", "2"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert {"linearity", "bound", "setpoint", "fit"} <= set(summary)
    for name in ("linearity_local", "alignment_within", "tracking_bound", "setpoint_alqr"):
        assert (out / f"{name}.png").is_file() and (out / f"{name}.json").is_file()
    r = runner.invoke(app, ["diagnose", "alqr", "--model", str(folder), "--out", str(out),
                            "--what", "nonsense"])
    assert r.exit_code == 2 and "unknown diagnostics" in r.output


def test_diagnose_barrier(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "barrier"
    r = runner.invoke(app, ["diagnose", "barrier", "--model", str(folder), "--out", str(out),
                            "--layer", "1", "--T", "1", "--steps", "4"])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "barrier_path.json").read_text())
    assert data["steps"] == 4 and len(data["mean"]) == 5
    assert (out / "barrier_path.png").is_file()


@pytest.mark.parametrize("method", ["odesteer", "alqr", "spid", "innsteer"])
def test_fit_other_methods(folder: Path, data: Path, tmp_path: Path, method: str) -> None:
    art = tmp_path / f"{method}.safetensors"
    extra = ["--epochs", "20"] if method == "innsteer" else []
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", method, "--data",
                            str(data), "--layers", "1", "--scope", "last", "--out", str(art),
                            *extra])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", "hello", "--model", str(folder), "--steer", str(art),
                            "--strength", "2", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("method", ["iti", "repe", "probe", "mean_act", "linear_act", "mimic",
                                    "angular"])
def test_fit_baselines(folder: Path, data: Path, tmp_path: Path, method: str) -> None:
    art = tmp_path / f"{method}.safetensors"
    extra = ["--top-k", "3"] if method == "iti" else []
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", method, "--data",
                            str(data), "--layers", "1", "--recipe", "last", "--out", str(art),
                            *extra])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["inspect", str(art)])
    assert r.exit_code == 0 and method in r.output, r.output
    r = runner.invoke(app, ["generate", "hello", "--model", str(folder), "--steer", str(art),
                            "--strength", "2", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output


def test_fit_iti_with_too_many_heads_fails_clearly(folder: Path, data: Path,
                                                   tmp_path: Path) -> None:
    art = tmp_path / "iti.safetensors"
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", "iti", "--data",
                            str(data), "--top-k", "999", "--out", str(art)])
    assert r.exit_code == 2, r.output
    assert "999" in r.output and not art.exists()


def test_fit_on_one_class_data_fails_and_writes_nothing(folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "same.jsonl"
    row = {"prompt": "How was it?", "positive": "Fine.", "negative": "Fine."}
    path.write_text("\n".join(json.dumps(row) for _ in range(3)) + "\n")
    art = tmp_path / "inn.safetensors"
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", "innsteer", "--data",
                            str(path), "--layers", "1", "--epochs", "5", "--out", str(art)])
    assert r.exit_code == 2, r.output
    assert "nothing to contrast" in r.output
    assert not art.exists() and not list(tmp_path.glob("*.safetensors*"))


def test_sae_train_fit_sas_and_features(folder: Path, data: Path, tmp_path: Path) -> None:
    sae_dir = tmp_path / "sae"
    r = runner.invoke(app, ["sae", "train", "--model", str(folder), "--layer", "1",
                            "--expansion", "4", "--k", "8", "--corpus", "builtin",
                            "--max-tokens", "1500", "--epochs", "2", "--spliced-texts", "5",
                            "--out", str(sae_dir)])
    assert r.exit_code == 0, r.output
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["hook_name"] == "blocks.1.hook_resid_post"
    assert (sae_dir / "sae_weights.safetensors").is_file()
    art = tmp_path / "sas.safetensors"
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", "sas", "--sae",
                            str(sae_dir), "--tau", "0", "--recipe", "last", "--data", str(data),
                            "--layers", "1", "--out", str(art)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["features", str(art), "--model", str(folder), "--max-texts", "20",
                            "--top", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert '"feature"' in r.output and '"snippets"' in r.output
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", "sas", "--sae",
                            str(sae_dir), "--tau", "1.5", "--data", str(data), "--layers", "1",
                            "--out", str(tmp_path / "bad.safetensors")])
    assert r.exit_code == 2 and "[0, 1]" in r.output
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", "sas", "--sae",
                            str(sae_dir), "--data", str(data), "--layers", "0",
                            "--out", str(tmp_path / "bad.safetensors")])
    assert r.exit_code == 2 and "resid_post.1" in r.output
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Unpaired positive and negative texts (the A-LQR paper's D+ / D− prompt sets)."""
    path = tmp_path_factory.mktemp("data") / "labelled.jsonl"
    rows = [{"text": t, "label": 1} for t in ("What a lovely day.", "I love it.", "Great fun.")]
    rows += [{"text": t, "label": 0} for t in ("What an awful day.", "I hate it.", "Dull.")]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("method", ["alqr", "spid"])
def test_lfs_on_a_labelled_file_with_the_paper_preset(folder: Path, labelled: Path,
                                                      tmp_path: Path, method: str) -> None:
    """``--data`` a labelled file for the LFS family; ``--preset paper`` sets the paper's
    values (a flag given on the command line overrides them) and ``inspect`` shows it."""
    from steerlab import artifacts

    art = tmp_path / f"{method}.safetensors"
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", method, "--data",
                            str(labelled), "--preset", "paper", "--lambda", "2", "--out",
                            str(art)])
    assert r.exit_code == 0, r.output
    meta = artifacts.read_metadata(art)
    hp = meta["hyperparameters"]
    assert hp["recipe"] == "last" and hp["lambdas"] == [2.0]
    if method == "alqr":
        assert (hp["q"], hp["r"], hp["q_f"], hp["n_jacobian_prompts"]) == (0.1, 3.0, 0.1, 50)
    else:
        assert (hp["kp"], hp["ki"], hp["kd"], hp["reset_every"]) == (0.7, 0.01, 0.1, 10)
    assert meta["fit"]["preset"]["name"] == "paper"
    assert meta["fit"]["preset"]["overrides"] == ["lambdas"]
    r = runner.invoke(app, ["inspect", str(art)])
    assert r.exit_code == 0 and "preset" in r.output and "paper" in r.output, r.output
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", method, "--data",
                            str(labelled), "--recipe", "mean", "--out", str(art)])
    assert r.exit_code == 2 and "recipe" in r.output


def test_a_preset_a_method_does_not_have_is_refused(folder: Path, data: Path,
                                                    tmp_path: Path) -> None:
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", "repe", "--data",
                            str(data), "--preset", "paper", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "no preset 'paper' for repe" in r.output, r.output


def test_iti_tuning_file_and_paper_preset(folder: Path, data: Path, labelled: Path,
                                          tmp_path: Path) -> None:
    """``--tuning FILE`` sets ITI's σ from a separate set; ``--preset paper`` records the
    reference's K, α, seed and validation ratio (an explicit --top-k overrides K)."""
    from steerlab import artifacts

    art = tmp_path / "iti.safetensors"
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", "iti", "--data",
                            str(data), "--recipe", "last", "--preset", "paper", "--top-k", "3",
                            "--tuning", str(labelled), "--out", str(art)])
    assert r.exit_code == 0, r.output
    meta = artifacts.read_metadata(art)
    assert meta["fit"]["tuning"] == "given"
    assert meta["fit"]["preset"]["overrides"] == ["recipe", "top_k"]
    assert meta["hyperparameters"]["top_k"] == 3 and meta["hyperparameters"]["alpha"] == 15.0


@pytest.mark.parametrize(("args", "message"), [
    (["--layers", "abc"], "--layers takes comma-separated block indices"),
    (["--layers", ""], "--layers is empty"),
    (["--layers", "30"], "out of range"),
    (["--method", "alqr", "--layers", "7"], "out of range"),
    (["--limit", "-1"], "--limit must be 0"),
    (["--method", "nope"], "unknown method"),
    (["--scope", "sideways"], "unknown token scope"),
    (["--data", "/nonexistent/file.jsonl"], "no such file"),
    (["--hp", "bogus=1"], "caa takes no hyper-parameter 'bogus'"),
    (["--method", "iti", "--hp", "top_k"], "--hp takes NAME=VALUE"),
    (["--hp", "=3"], "--hp takes NAME=VALUE"),
])
def test_fit_argument_errors_are_one_line_before_any_model_load(
        folder: Path, tmp_path: Path, args: list[str], message: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every argument error of ``fit``: one line, exit 2, no traceback, and before the model
    loads or any activation is collected (the layer range is read from the config)."""
    import steerlab.cli.common as cli  # every command loads through common._load

    def no_load(model: str) -> None:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load", no_load)
    r = runner.invoke(app, ["fit", "--model", str(folder), "--out", str(tmp_path / "x"),
                            *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1, r.output


def test_fit_out_onto_a_directory_is_refused_first(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "d.safetensors").mkdir()
    for out in (tmp_path, tmp_path / "d"):
        r = runner.invoke(app, ["fit", "--model", str(folder), "--layers", "1", "--out",
                                str(out)])
        assert r.exit_code == 2 and "is a directory" in r.output, r.output


def test_generate_refuses_absurd_strengths_and_prompts_past_the_context(
        folder: Path, data: Path, tmp_path: Path) -> None:
    art = tmp_path / "v.safetensors"
    assert runner.invoke(app, ["fit", "--model", str(folder), "--data", str(data), "--layers",
                               "1", "--out", str(art)]).exit_code == 0
    r = runner.invoke(app, ["generate", "hi", "--model", str(folder), "--steer", str(art),
                            "--strength", "1e38"])
    assert r.exit_code == 2 and "outside" in r.output, r.output
    r = runner.invoke(app, ["generate", "word " * 300, "--model", str(folder),
                            "--max-new-tokens", "4"])
    assert r.exit_code == 2 and "exceeds" in r.output and "context" in r.output, r.output


def test_fit_hp_sets_any_hyperparameter(folder: Path, data: Path, tmp_path: Path) -> None:
    """``--hp NAME=VALUE`` (VALUE as JSON, else a string) sets a constructor argument no flag
    covers, and overrides a flag's."""
    from steerlab import artifacts

    art = tmp_path / "caa.safetensors"
    r = runner.invoke(app, ["fit", "--model", str(folder), "--data", str(data), "--layers", "1",
                            "--hp", "normalize=2.5", "--hp", "site=resid_pre", "--out", str(art)])
    assert r.exit_code == 0, r.output
    meta = artifacts.read_metadata(art)
    assert meta["hyperparameters"]["normalize"] == 2.5
    assert meta["hyperparameters"]["site"] == "resid_pre"
    assert meta["sites"] == ["resid_pre.1"]
    art = tmp_path / "spid.safetensors"
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", "spid", "--data",
                            str(data), "--lambda", "3", "--hp", "lambdas=[0.5]", "--hp",
                            "kp=0.4", "--out", str(art)])
    assert r.exit_code == 0, r.output
    hp = artifacts.read_metadata(art)["hyperparameters"]
    assert hp["lambdas"] == [0.5] and hp["kp"] == 0.4


def test_fit_hp_bad_value_is_one_line(folder: Path, data: Path, tmp_path: Path) -> None:
    for args, message in ((["--hp", "normalize=-1"], "normalize must be a positive norm"),
                          (["--method", "iti", "--hp", "top_k=many"], "top_k must be a positive"),
                          (["--method", "repe", "--hp", "variant=[1, 2]"], "variant"),
                          (["--method", "actadd", "--hp", "layer=x"], "actadd refuses a value")):
        r = runner.invoke(app, ["fit", "--model", str(folder), "--data", str(data), "--layers",
                                "1", *args, "--out", str(tmp_path / "x.safetensors")])
        assert r.exit_code == 2, r.output
        assert message in r.output and "Traceback" not in r.output, r.output
        assert r.output.strip().splitlines()[-1].startswith("error:"), r.output
        assert not (tmp_path / "x.safetensors").exists()


def test_fit_a_method_a_user_registered(folder: Path, data: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A method added to ``METHODS`` fits with ``steerlab fit --method NAME`` (its block from
    --layers, its other hyper-parameters from --hp) without any change to the CLI."""
    import torch

    from steerlab import artifacts
    from steerlab.methods import METHODS
    from steerlab.methods.additive import AdditiveController
    from steerlab.sites import Site

    class HalfShift(AdditiveController):
        method = "half_shift_test"

        def __init__(self, layers: int | list[int] = 0, *, scale: float = 0.5,
                     recipe: str = "last", scope: str = "all") -> None:
            super().__init__()
            self.layers = [layers] if isinstance(layers, int) else list(layers)
            self.scale, self.recipe = scale, recipe
            self._set_scope(scope)

        def fit_sites(self) -> list[Site]:
            return [Site("resid_post", k) for k in self.layers]

        def fit(self, positive: dict[Site, torch.Tensor],
                negative: dict[Site, torch.Tensor]) -> HalfShift:
            self.set_vectors({s: self.scale * (positive[s].mean(0) - negative[s].mean(0))
                              for s in positive})
            return self

    monkeypatch.setitem(METHODS, HalfShift.method, HalfShift)
    art = tmp_path / "half.safetensors"
    r = runner.invoke(app, ["fit", "--model", str(folder), "--method", "half_shift_test",
                            "--data", str(data), "--layers", "0,-1", "--hp", "scale=0.25",
                            "--out", str(art)])
    assert r.exit_code == 0, r.output
    meta = artifacts.read_metadata(art)
    assert meta["method"] == "half_shift_test" and meta["sites"] == ["resid_post.0",
                                                                     "resid_post.1"]
    assert meta["hyperparameters"] == {"layers": [0, 1], "scale": 0.25, "recipe": "mean",
                                       "scope": "all"}


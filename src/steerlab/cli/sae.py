"""``steerlab sae train`` and ``steerlab features``: sparse autoencoders and what SAS pushes."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from steerlab.cli import common
from steerlab.cli.common import ModelOption, console, fail, load_artifact
from steerlab.errors import SteerlabError

sae_app = typer.Typer(help="Sparse autoencoders on residual-stream activations (for SAS).",
                      no_args_is_help=True)

def corpus_texts(corpus: str) -> list[str]:
    """``builtin``, ``shared`` (the shared data folder: :func:`steerlab.data.shared_data_dir`,
    ``$STEERLAB_DATA`` first), or a path."""
    from steerlab.corpus import builtin_corpus, load_corpus
    from steerlab.data import shared_data_dir

    if corpus == "builtin":
        return builtin_corpus()
    if corpus == "shared":
        try:
            folder = shared_data_dir()
        except SteerlabError as exc:
            raise SteerlabError(f"{exc}; give --corpus PATH or builtin") from exc
        return load_corpus(folder)
    return load_corpus(corpus)


@sae_app.command("train")
def sae_train(
    out: Annotated[Path, typer.Option("--out", "-o", help="SAELens folder to write")],
    model: ModelOption = "smollm2-135m",
    layer: Annotated[int, typer.Option(help="block whose output the SAE reads")] = 12,
    expansion: Annotated[int, typer.Option(help="d_sae = expansion × hidden size")] = 8,
    architecture: Annotated[str, typer.Option(help="topk, relu or jumprelu")] = "topk",
    k: Annotated[int, typer.Option(help="TopK: active features per token")] = 32,
    corpus: Annotated[str, typer.Option(help="builtin, shared or a path")] = "shared",
    max_tokens: Annotated[int, typer.Option(help="training tokens")] = 200_000,
    epochs: Annotated[int, typer.Option(help="passes over the tokens")] = 3,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    spliced_texts: Annotated[int, typer.Option(help="held-out texts for the spliced loss")] = 50,
) -> None:
    """Train an SAE on a corpus's token activations and save it in SAELens's format."""
    try:
        from steerlab.corpus import corpus_activations
        from steerlab.evals.sae import spliced_loss
        from steerlab.sae import SAEConfig, hook_name_for_site, save_saelens, train_sae

        lm = common._load(model)
        texts = corpus_texts(corpus)
        random.Random(seed).shuffle(texts)
        held = texts[:spliced_texts]
        train = texts[spliced_texts:] or texts
        site = f"resid_post.{layer}"
        shards = corpus_activations(lm, train, site, max_tokens=max_tokens)
        held_acts = corpus_activations(lm, held, site, max_tokens=max_tokens)
        cfg = SAEConfig(d_in=lm.info.hidden_size, d_sae=expansion * lm.info.hidden_size,
                        architecture=architecture,  # type: ignore[arg-type]
                        k=k if architecture == "topk" else None, site=site,
                        hook_name=hook_name_for_site(site), model_name=lm.info.model_id)
        sae, report = train_sae(shards, cfg, epochs=epochs, seed=seed,
                                eval_activations=held_acts)
        figures = report.to_dict()
        figures.pop("history", None)
        figures.pop("recon_history", None)
        figures.update(spliced_loss(lm, sae, site, held))
        figures.update(train_tokens=shards.n_tokens, heldout_tokens=held_acts.n_tokens)
        sae.train_report = figures
        path = save_saelens(sae, out)
        console.print(f"[green]saved[/] {path}")
        console.print_json(json.dumps(figures))
    except SteerlabError as exc:
        fail(exc)


def features(
    artifact: Annotated[Path, typer.Argument(help="an SAS artifact (.safetensors)")],
    model: ModelOption = "smollm2-135m",
    corpus: Annotated[str, typer.Option(help="builtin, shared or a path")] = "builtin",
    top: Annotated[int, typer.Option(help="features to list")] = 10,
    snippets: Annotated[int, typer.Option(help="snippets per feature")] = 3,
    max_texts: Annotated[int, typer.Option(help="corpus texts to scan")] = 500,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List an SAS vector's top features with the corpus snippets that fire them most."""
    try:
        from steerlab.features import top_activating
        from steerlab.methods.sas import SAS

        lm = common._load(model)
        c = load_artifact(artifact, lm.info)
        if not isinstance(c, SAS):
            raise SteerlabError(f"{artifact} is a {c.method} artifact, not an SAS vector")
        sae = c._require_sae()
        ids = c.feature_ids[:top]
        values = dict(zip(c.feature_ids, c.feature_values, strict=True))
        texts = corpus_texts(corpus)[:max_texts]
        found = top_activating(lm, sae, c.sites[0], ids, texts, n_snippets=snippets,
                               progress=True)
        rows = [{"feature": f, "value": round(values[f], 4),
                 "snippets": [{"activation": a, "text": t} for a, t in found[f]]} for f in ids]
        if as_json:
            console.print_json(json.dumps(rows))
            return
        table = Table(title=f"{artifact.name}: {len(c.feature_ids)} features, top {len(ids)}")
        table.add_column("feature")
        table.add_column("value", justify="right")
        table.add_column("top-activating snippets (token in «»)")
        for f in ids:
            text = "\n".join(f"{a:.2f}  {t}" for a, t in found[f])
            table.add_row(str(f), f"{values[f]:+.3f}", text or "(never fires)")
        console.print(table)
    except SteerlabError as exc:
        fail(exc)

"""Sparse autoencoders (SAEs) on residual-stream activations: trained here, or loaded from
SAELens's on-disk format.

The package, by module:

* :mod:`steerlab.sae.config`: :class:`SAEConfig` (shape, architecture ``relu``, ``jumprelu``
  or ``topk``, site) and the site <-> TransformerLens hook-name mapping;
* :mod:`steerlab.sae.model`: :class:`SparseAutoencoder` (the equations) and the activation
  functions;
* :mod:`steerlab.sae.train`: :func:`train_sae` (normalisation, schedule, dead features) with
  one training strategy per architecture (its losses), and :class:`TrainReport`;
* :mod:`steerlab.sae.evaluate`: :func:`evaluate_sae` (FVU, mean L0, dead fraction);
* :mod:`steerlab.sae.sources`: the activation sources training and evaluation read;
* :mod:`steerlab.sae.saelens`: SAELens folders (:func:`save_saelens`, :func:`load_saelens`);
* :mod:`steerlab.sae.corpus`: text corpora and their token activations, cached on disk as
  shards (also importable as :mod:`steerlab.corpus`);
* :mod:`steerlab.sae.features`: an SAS vector's top features and the snippets that fire them
  (also importable as :mod:`steerlab.features`).

Everything ``steerlab.sae`` held when it was one module is importable from here. The corpus and
features modules load the model stack, so they are not imported by this package.
"""

from __future__ import annotations

# Re-exported so that ``steerlab.sae.save_file`` stays the writer SAELens folders go through
# (replacing it simulates a failed write; see steerlab.sae.saelens._save_file).
from safetensors.torch import load_file as load_file
from safetensors.torch import save_file as save_file

from steerlab.sae.config import ARCHITECTURES, SAEConfig, hook_name_for_site, site_for_hook_name
from steerlab.sae.config import Architecture as Architecture
from steerlab.sae.evaluate import evaluate_sae
from steerlab.sae.model import SparseAutoencoder, topk_relu
from steerlab.sae.saelens import CFG_FILENAME as CFG_FILENAME
from steerlab.sae.saelens import SAELENS_ARCHITECTURES as SAELENS_ARCHITECTURES
from steerlab.sae.saelens import STEERLAB_FORMAT_VERSION as STEERLAB_FORMAT_VERSION
from steerlab.sae.saelens import TO_SAELENS as TO_SAELENS
from steerlab.sae.saelens import WEIGHTS_FILENAME as WEIGHTS_FILENAME
from steerlab.sae.saelens import load_saelens, saelens_config, saelens_tensors, save_saelens
from steerlab.sae.sources import Activations
from steerlab.sae.train import THRESHOLD_LR_FACTOR as THRESHOLD_LR_FACTOR
from steerlab.sae.train import TrainReport, train_sae

# The names of the former single module's __all__ (the other module-level names above are
# importable too, as they were).
__all__ = [
    "ARCHITECTURES",
    "Activations",
    "SAEConfig",
    "SparseAutoencoder",
    "TrainReport",
    "evaluate_sae",
    "hook_name_for_site",
    "load_saelens",
    "saelens_config",
    "saelens_tensors",
    "save_saelens",
    "site_for_hook_name",
    "topk_relu",
    "train_sae",
]

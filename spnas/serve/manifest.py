"""The KServe ``InferenceService`` that runs ``spnas serve`` on a cluster, built from the typed
models of the ``kserve`` package (0.21.0) and serialised with the Kubernetes ``ApiClient``.

The predictor is a *custom* container (``kserve-container``) running the project image's
``spnas serve /mnt/models --port 8080 --host 0.0.0.0 --name NAME``. The export's URI travels as
the container's ``STORAGE_URI`` environment variable: for a custom predictor that is where
KServe looks for the model's location (``CustomPredictor.GetStorageUri`` in
``pkg/apis/serving/v1beta1/predictor_custom.go``, kserve/kserve v0.20.0 and the main branch of
2026-08), and its pod webhook then adds the storage-initializer init container, which downloads
the URI into ``/mnt/models`` (``DefaultModelLocalMountPath``), mounts that volume into the
container and sets ``STORAGE_URI=/mnt/models`` (``storage_initializer_injector.go``, same
version). ``PredictorSpec`` has no ``storageUri`` field of its own: only the framework specs and
``storageUris`` (KServe >= 0.16) do. Never applied to a real cluster here (see docs/serving.md).
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..storage.uri import SCHEMES, parse_uri
from ..utils import checks
from ..utils.errors import ConfigError, ServeError, StorageError, brief
from ..utils.fileio import atomic_write_text
from .bundle import check_model_name, load_export
from .deps import import_kserve

log = logging.getLogger(__name__)

API_VERSION = "serving.kserve.io/v1beta1"
KIND = "InferenceService"
CONTAINER_NAME = "kserve-container"      # the container KServe treats as the custom predictor
STORAGE_URI_ENV = "STORAGE_URI"          # where a custom predictor's model location is read from
MODEL_MOUNT = "/mnt/models"              # where the storage initializer puts the model
SERVING_PORT = 8080
MANIFEST_FILE = "inferenceservice.yaml"
DEFAULT_ACCELERATOR = "nvidia.com/gpu"
#: schemes KServe's default storage initializer downloads (s3:// and minio:// are the same S3 store
#: for spnas; KServe knows s3:// only, so minio:// is written as s3://)
OTHER_SCHEMES = ("gs", "pvc", "https", "http", "hdfs", "webhdfs")
#: KServe's InferenceService name format (IsvcNameFmt); at most 47 characters so that Knative's
#: ``NAME-predictor-00001`` stays a 63-character DNS label
ISVC_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_ISVC_NAME = 47
NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RESOURCE_KEYS = ("cpu", "memory", "gpus", "accelerator")


def storage_uri_for_kserve(uri: str) -> str:
    """``uri`` as KServe's storage initializer reads it: ``minio://`` becomes ``s3://`` and an S3
    folder ends with ``/`` (KServe lists objects by prefix, so ``s3://b/export`` would also fetch
    ``s3://b/export2/...``); ``gs://``, ``pvc://``, ``http(s)://``, ``(web)hdfs://`` pass as
    they are. :class:`ConfigError` for anything else."""
    if not isinstance(uri, str):
        raise checks.fail("--storage-uri", "a URI string", uri)
    scheme, sep, rest = uri.partition("://")
    if sep and scheme.lower() in SCHEMES:
        try:
            bucket, key = parse_uri(uri)
        except StorageError as exc:
            raise ConfigError(f"--storage-uri: {exc}") from None
        if key and not key.endswith("/"):
            key += "/"
        return f"s3://{bucket}/{key}"
    if sep and scheme.lower() in OTHER_SCHEMES and rest.strip("/"):
        return uri
    raise checks.fail("--storage-uri", f"an s3://, minio:// or {', '.join(s + '://' for s in OTHER_SCHEMES)} URI "
                                       "of the export folder", uri)


def _quantity(value: Any, where: str) -> str:
    from kubernetes.utils import parse_quantity
    text = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    try:
        if not isinstance(text, str) or parse_quantity(text) <= 0:
            raise ValueError
    except (ValueError, ArithmeticError):
        raise checks.fail(where, "a positive Kubernetes quantity (e.g. 2, 500m, 4Gi)", value) from None
    return text


def resource_requirements(resources: Mapping[str, Any] | None) -> tuple[dict[str, str], dict[str, str]]:
    """``{"cpu", "memory", "gpus", "accelerator"}`` -> ``(requests, limits)``: cpu and memory are
    requested and limited alike, ``gpus`` GPUs of ``accelerator`` (default ``nvidia.com/gpu``)
    are limited (Kubernetes requests extended resources at their limit)."""
    resources = dict(resources or {})
    unknown = sorted(set(resources) - set(RESOURCE_KEYS))
    if unknown:
        raise ConfigError(f"resources: unknown key(s) {unknown} (known: {list(RESOURCE_KEYS)})")
    requests: dict[str, str] = {}
    for key in ("cpu", "memory"):
        if resources.get(key) is not None:
            requests[key] = _quantity(resources[key], f"--{key}")
    limits = dict(requests)
    gpus = checks.integer(resources.get("gpus") or 0, "--gpus", 0, 64)
    if gpus:
        accelerator = resources.get("accelerator") or DEFAULT_ACCELERATOR
        if not isinstance(accelerator, str) or "/" not in accelerator:
            raise checks.fail("accelerator", "an extended resource name such as nvidia.com/gpu", accelerator)
        limits[accelerator] = str(gpus)
    return requests, limits


def check_isvc_name(name: Any) -> str:
    """``name`` if it is a valid InferenceService name, else :class:`ConfigError`."""
    if not isinstance(name, str) or not ISVC_NAME_RE.match(name) or len(name) > MAX_ISVC_NAME:
        raise checks.fail("--name", f"a lower-case DNS label of at most {MAX_ISVC_NAME} characters (letters, digits, "
                                    "'-', starting with a letter)", name)
    return name


def inference_service(name: str, storage_uri: str, image: str, *, namespace: str | None = None,
                      resources: Mapping[str, Any] | None = None, model_name: str | None = None,
                      service_account: str | None = None, min_replicas: int | None = None,
                      max_replicas: int | None = None, labels: Mapping[str, str] | None = None,
                      annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ``InferenceService`` ``name`` (in ``namespace``) serving the export at ``storage_uri``
    with ``image``'s ``spnas serve``, as a plain dict ready for YAML or the Kubernetes API.

    The served model is called ``model_name`` (default ``name``: KServe's own runtimes name the
    model after the service), so requests go to ``/v2/models/NAME/infer``. ``resources``: see
    :func:`resource_requirements`. ``service_account`` should hold the S3 credentials the storage
    initializer uses (KServe reads them from the service account's secrets). Raises
    :class:`ConfigError` naming the bad setting.
    """
    import_kserve()
    from kserve.models import V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec
    from kubernetes import client as k8s

    name = check_isvc_name(name)
    if namespace is not None and (not isinstance(namespace, str) or not NAMESPACE_RE.match(namespace)
                                  or len(namespace) > 63):
        raise checks.fail("--namespace", "a lower-case DNS label of at most 63 characters", namespace)
    if not isinstance(image, str) or not image.strip() or any(c.isspace() for c in image):
        raise checks.fail("--image", "a container image reference such as registry.example.com/spnas:0.1.0", image)
    served = check_model_name(model_name if model_name is not None else name, "model name")
    uri = storage_uri_for_kserve(storage_uri)
    requests, limits = resource_requirements(resources)
    for what, value in (("min_replicas", min_replicas), ("max_replicas", max_replicas)):
        if value is not None:
            checks.integer(value, what, 0, 1000)
    if min_replicas is not None and max_replicas is not None and max_replicas < min_replicas:
        raise ConfigError(f"max_replicas: must be >= min_replicas ({min_replicas}), got {max_replicas}")
    if service_account is not None and (not isinstance(service_account, str) or not NAMESPACE_RE.match(service_account)):
        raise checks.fail("--service-account", "a service account name (a lower-case DNS label)", service_account)

    container = k8s.V1Container(
        name=CONTAINER_NAME,
        image=image,
        command=["spnas"],
        # 0.0.0.0: the pod's port must be reachable from outside the container (spnas serve
        # listens on 127.0.0.1 unless told otherwise)
        args=["serve", MODEL_MOUNT, "--port", str(SERVING_PORT), "--host", "0.0.0.0", "--name", served],
        env=[k8s.V1EnvVar(name=STORAGE_URI_ENV, value=uri)],
        ports=[k8s.V1ContainerPort(container_port=SERVING_PORT, name="http1", protocol="TCP")],
        resources=k8s.V1ResourceRequirements(requests=requests or None, limits=limits or None),
    )
    predictor = V1beta1PredictorSpec(containers=[container], service_account_name=service_account,
                                     min_replicas=min_replicas, max_replicas=max_replicas)
    isvc = V1beta1InferenceService(
        api_version=API_VERSION, kind=KIND,
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=dict(labels) if labels else None,
                                  annotations=dict(annotations) if annotations else None),
        spec=V1beta1InferenceServiceSpec(predictor=predictor))
    doc = k8s.ApiClient().sanitize_for_serialization(isvc)
    check_manifest(doc)
    return doc


def _model_class(type_name: str) -> type | None:
    import kserve.models
    from kubernetes import client as k8s
    return getattr(kserve.models, type_name, None) or getattr(k8s, type_name, None)


_PRIMITIVES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float),
                                            "datetime": (str,), "date": (str,)}


def _check(value: Any, type_name: str, path: str) -> None:
    if value is None or type_name == "object":
        return
    if type_name.startswith("list["):
        if not isinstance(value, list):
            raise ServeError(f"{path}: must be a list ({type_name}), got {brief(value)}")
        for i, item in enumerate(value):
            _check(item, type_name[5:-1], f"{path}[{i}]")
        return
    if type_name.startswith("dict("):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ServeError(f"{path}: must be a mapping ({type_name}), got {brief(value)}")
        inner = type_name[5:-1].split(", ", 1)[1]
        for key, item in value.items():
            _check(item, inner, f"{path}.{key}")
        return
    if type_name in _PRIMITIVES:
        ok = isinstance(value, _PRIMITIVES[type_name]) and (type_name == "bool" or not isinstance(value, bool))
        if not ok:
            raise ServeError(f"{path}: must be {type_name}, got {brief(value)}")
        return
    cls = _model_class(type_name)
    if cls is None:
        raise ServeError(f"{path}: type {type_name} is unknown to the installed kserve and kubernetes models")
    if not isinstance(value, dict):
        raise ServeError(f"{path}: must be a mapping ({type_name}), got {brief(value)}")
    fields = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    for key, item in value.items():
        if key not in fields:
            raise ServeError(f"{path or '<root>'}.{key}: not a field of {type_name}")
        _check(item, cls.openapi_types[fields[key]], f"{path}.{key}" if path else key)


def check_manifest(doc: Mapping[str, Any]) -> None:
    """:class:`ServeError` naming the first key of ``doc`` that is not a field of the typed models
    (kserve's ``V1beta1InferenceService`` down to the Kubernetes ``V1Container``) or has the
    wrong JSON type, or when ``apiVersion``/``kind`` are not an InferenceService's."""
    import_kserve()
    if not isinstance(doc, Mapping):
        raise ServeError(f"an InferenceService manifest must be a mapping, got {brief(doc)}")
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != KIND:
        raise ServeError(f"not a {API_VERSION} {KIND}: apiVersion {brief(doc.get('apiVersion'))}, "
                         f"kind {brief(doc.get('kind'))}")
    _check(dict(doc), "V1beta1InferenceService", "")


def manifest_yaml(doc: Mapping[str, Any]) -> str:
    """``doc`` as YAML, keys in the order built."""
    import yaml
    return yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=False)


def write_manifest(export_dir: str | os.PathLike, storage_uri: str, image: str, *, name: str | None = None,
                   namespace: str | None = None, resources: Mapping[str, Any] | None = None,
                   service_account: str | None = None, allow_unverified: bool = False,
                   **options: Any) -> Path:
    """Check the export folder (:func:`~spnas.serve.bundle.load_export`: an export whose parity
    gate did not pass is refused unless ``allow_unverified``) and write its InferenceService to
    ``export_dir/inferenceservice.yaml`` atomically; returns the path. ``name`` defaults to
    ``export.json``'s name; ``options`` go to :func:`inference_service`."""
    bundle = load_export(export_dir, allow_unverified=allow_unverified)
    doc = inference_service(name if name is not None else bundle.name, storage_uri, image, namespace=namespace,
                            resources=resources, service_account=service_account, **options)
    path = atomic_write_text(Path(export_dir) / MANIFEST_FILE, manifest_yaml(doc), mode=0o644)
    log.info("wrote %s: InferenceService %s serving %s", path, doc["metadata"]["name"],
             doc["spec"]["predictor"]["containers"][0]["env"][0]["value"])
    return path

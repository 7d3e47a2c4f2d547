"""Serving an exported detector or Mask R-CNN: ``spnas serve`` (a KServe model server on ONNX
Runtime) and the KServe ``InferenceService`` manifest that runs it on a cluster.

Modules: ``bundle`` (the export folder, checked: no kserve, no torch), ``rle`` (masks as COCO
RLEs: numpy and pycocotools), ``server`` (the model server; needs the ``serve`` extra),
``manifest`` (the typed InferenceService; needs the ``serve`` extra), ``cli`` (the ``serve`` and
``manifest`` subcommands). Importing this package imports none of them.
"""

"""Serving an exported detector, Mask R-CNN or SemanticFPN: ``spnas serve`` (a KServe model
server on ONNX Runtime) and the KServe ``InferenceService`` manifest that runs it on a cluster.

Modules: ``bundle`` (the export folder, checked: no kserve, no torch), ``rle`` (masks as COCO
RLEs: numpy and pycocotools), ``labelmap`` (label maps as PNG: numpy and Pillow), ``server``
(the model server; needs the ``serve`` extra), ``manifest`` (the typed InferenceService; needs
the ``serve`` extra), ``cli`` (the ``serve`` and ``manifest`` subcommands). Importing this
package imports none of them.
"""

"""The orchestration layer: the phase functions (the seam), the one step-to-phase mapping, the
search rounds on the state file, the local runner (``spnas run``), the pod functions the Kubeflow
components call, and reports."""

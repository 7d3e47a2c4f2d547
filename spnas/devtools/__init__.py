"""Developer tools for local runs and tests: the embedded S3 object store (SeaweedFS ``weed
mini``). Fail points live in :mod:`spnas.utils.faults`."""

"""The `assay` command for every role, and `assay up` and `assay demo`, which run the platform on one machine."""

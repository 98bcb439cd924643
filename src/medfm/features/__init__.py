"""Feature extraction: a manifest through a registered model to a feature table and its provenance sidecar."""

"""The render API: an HTTP front door to intake, jobs, assets and consent (docs/api.md)."""

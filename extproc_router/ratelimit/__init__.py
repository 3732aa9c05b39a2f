"""Request and token rate limits: per-model requests/s (profiles) and per-user RPM/TPM."""

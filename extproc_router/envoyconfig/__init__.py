"""Envoy bootstrap rendering from the seed's values.yaml knobs (``extproc-router envoy-config``)."""

from extproc_router.envoyconfig.render import (
    METADATA_NAMESPACE,
    RESPONSE_ECHO_HEADERS,
    TARGET_POD_HEADER,
    render_bootstrap,
    to_yaml,
)
from extproc_router.envoyconfig.values import GatewayValues, ValuesError, load_values

__all__ = [
    "METADATA_NAMESPACE",
    "RESPONSE_ECHO_HEADERS",
    "TARGET_POD_HEADER",
    "GatewayValues",
    "ValuesError",
    "load_values",
    "render_bootstrap",
    "to_yaml",
]

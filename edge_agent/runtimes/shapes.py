"""Input tensor shape implied by a manifest input spec."""

from __future__ import annotations

from edge_agent.protocol.manifest import InputSpec, Layout


def expected_shape(spec: InputSpec) -> tuple[int, int, int, int]:
    if spec.layout is Layout.NCHW:
        return (1, 3, spec.height, spec.width)
    return (1, spec.height, spec.width, 3)

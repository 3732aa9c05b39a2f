"""The pod file (extproc_router/discovery/static_file.py): its forms and errors naming the entry."""

from __future__ import annotations

import pytest

from extproc_router.discovery.static_file import DiscoveryError, parse_pod_file


def test_pod_file_forms() -> None:
    f = parse_pod_file({"models": {"m": {"config": {"defaultProfile": "x"}, "pods": [
        {"name": "a", "address": "10.0.0.1:8000", "labels": {"role-name": "prefill", "roleset-name": "r"}},
        {"name": "b", "ip": "10.0.0.2", "labels": {"model.aibrix.ai/port": "9000"}, "namespace": "ns"},
        {"ip": "::1"},
    ]}}})
    assert [p.address for p in f.pods] == ["10.0.0.1:8000", "10.0.0.2:9000", "[::1]:8000"]
    assert f.pods[0].role == "prefill" and f.pods[0].roleset == "r"
    assert f.pods[1].key == "ns/b" and f.pods[2].name == "m-2"
    assert '"defaultProfile"' in (f.model_configs["m"] or "")


@pytest.mark.parametrize(("doc", "fragment"), [
    ({"models": {"m": {"pods": [{"address": "pod.local:80"}]}}}, "literal IP"),
    ({"models": {"m": {"pods": [{"address": "10.0.0.1"}]}}}, "ip:port"),
    ({"models": {"m": {"pods": [{"address": "10.0.0.1:99999"}]}}}, "out of range"),
    ({"models": {"m": {"pods": [{"ip": "10.0.0.1", "colour": "red"}]}}}, "colour"),
    ({"models": {"m": {"pods": [{"address": "10.0.0.1:1"}, {"address": "10.0.0.1:1"}]}}}, "already used"),
    ({"modles": {}}, "modles"),
    ({"models": {"m": {"pods": "x"}}}, "expected a list"),
])
def test_pod_file_errors_name_the_entry(doc: dict, fragment: str) -> None:
    with pytest.raises(DiscoveryError, match=fragment):
        parse_pod_file(doc, "gw.yaml")

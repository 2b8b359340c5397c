"""The official ``replicate`` client (1.0.7) against a real server: the calls a user makes work unchanged,
and errors surface as ``ReplicateError`` with the right status."""

from __future__ import annotations

from pathlib import Path

import pytest
from replicate.exceptions import ReplicateError


def test_models_create_get_and_versions_list(live_server, tmp_path: Path):
    client = live_server.replicate("alice")
    model = client.models.create("alice", "y", visibility="private", hardware="cpu", description="dest")
    assert (model.owner, model.name, model.visibility, model.description) == ("alice", "y", "private", "dest")
    assert model.latest_version is None
    reg = live_server.registry
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    version = reg.publish("alice/y", src, parent={"hub_id": "o/base", "revision": "0" * 40})
    got = client.models.get("alice/y")
    assert got.latest_version.id == version.id
    page = got.versions.list()
    assert [v.id for v in page] == [version.id] and page.next is None
    assert page[0].created_at.year >= 2024 and "Output" in page[0].openapi_schema["components"]["schemas"]
    assert got.versions.get(version.id).id == version.id
    assert client.accounts.current().username == "alice"
    assert [h.sku for h in client.hardware.list()][0] == "cpu"


def test_errors_are_replicate_errors_with_status(live_server):
    alice = live_server.replicate("alice")
    with pytest.raises(ReplicateError) as err:
        alice.models.create("bob", "m", visibility="public", hardware="cpu")
    assert err.value.status == 403 and "bob" in err.value.detail
    live_server.replicate("bob").models.create("bob", "hidden", visibility="private", hardware="cpu")
    with pytest.raises(ReplicateError) as err:
        alice.models.get("bob/hidden")
    assert err.value.status == 404 and err.value.title == "Not Found"
    alice.models.create("alice", "m", visibility="public", hardware="cpu")
    with pytest.raises(ReplicateError) as err:
        alice.models.create("alice", "m", visibility="public", hardware="cpu")
    assert err.value.status == 409
    import replicate

    anonymous = replicate.Client(api_token="ft_wrong", base_url=live_server.url)
    with pytest.raises(ReplicateError) as err:
        anonymous.models.get("alice/m")
    assert err.value.status == 401


def test_models_list_paginates_through_the_client(live_server):
    from replicate.pagination import paginate

    client = live_server.replicate("alice")
    for i in range(3):
        client.models.create("alice", f"m{i}", visibility="private", hardware="cpu")
    names = [m.name for page in paginate(client.models.list) for m in page]
    assert names == ["m0", "m1", "m2"]
    assert client.models.delete("alice/m0") is True


def test_the_client_finds_the_server_through_its_environment_variables(live_server, monkeypatch):
    import replicate

    monkeypatch.setenv("REPLICATE_BASE_URL", live_server.url)
    monkeypatch.setenv("REPLICATE_API_TOKEN", live_server.tokens["bob"])
    assert replicate.Client().accounts.current().username == "bob"

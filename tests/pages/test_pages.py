"""What the pages say, without a browser: names only where user_label allows, reasons everywhere."""

from __future__ import annotations

import dataclasses
import json

from exporter.config import Config, EstateConfig
from exporter.engine import Engine
from exporter.labels import UserLabeler
from exporter.pages import TraceNotFound, landing_page, stuck_document, trace_documents, trace_page
from tests.builders import ad, ad_user, cm, cm_for, entra, entra_for
from tests.fakes import Clock, FakeSource

NOW = 1_000_000.0


def snapshot(user_label="upn"):
    stuck = ad_user("stuck.user", when_created=NOW - 10 * 3600)
    done = ad_user("done.user", when_created=NOW - 50 * 3600)
    synced = [entra_for(stuck), entra_for(done)]
    records = [cm_for(stuck), cm_for(done, in_collection=True, cloud_user_id=synced[1].id)]
    sources = [
        FakeSource("ad", ad(stuck, done)),
        FakeSource("entra", entra(*synced)),
        FakeSource("configmgr", cm(*records)),
    ]
    engine = Engine(
        Config(estates=(EstateConfig(name="contoso"),), user_label=user_label),
        {"contoso": sources},
        clock=Clock(NOW),
    )
    engine.refresh_all()
    return engine.snapshot()


def test_landing_page_names_the_stuck_user_and_the_reason():
    page = landing_page(snapshot())
    assert "stuck.user@contoso.com" in page and "not_in_intune_collection" in page
    assert "Add the user to one of the Intune collections" in page
    assert "trace?user=stuck.user%40contoso.com" in page or "trace?user=stuck.user@contoso.com" in page


def test_user_label_none_names_nobody_anywhere():
    current = snapshot("none")
    page = landing_page(current)
    document = json.dumps(stuck_document(current))
    for text in (page, document):
        assert "stuck.user" not in text and "done.user" not in text
    assert "not_in_intune_collection" in page
    stages = stuck_document(current)["estates"][0]["stages"]
    assert stages["cm_discovered"]["reasons"]["not_in_intune_collection"] == 1
    assert "users" not in stages["cm_discovered"]


def test_hash_labels_are_not_links_and_have_no_detail():
    current = snapshot("hash")
    page = landing_page(current)
    assert "stuck.user" not in page and "trace?user=" not in page
    (user,) = stuck_document(current)["estates"][0]["stages"]["cm_discovered"]["users"]
    assert user["reason"] == "not_in_intune_collection" and user["detail"] is None and user["action"]
    assert len(user["user"]) == 16


def test_stuck_document_gives_reason_detail_and_action():
    (user,) = stuck_document(snapshot())["estates"][0]["stages"]["cm_discovered"]["users"]
    assert user["user"] == "stuck.user@contoso.com"
    assert user["reason"] == "not_in_intune_collection"
    assert "is not a member of PS100012" in user["detail"]
    assert user["action"].startswith("Add the user")


def test_trace_finds_by_any_name_and_404s_otherwise():
    current = snapshot()
    (document,) = trace_documents(current, "STUCK.USER@CONTOSO.COM")
    assert document["reason"] == "not_in_intune_collection" and document["stuck"] is True
    assert [s["done"] for s in document["steps"]] == [True, True, True, False, False, False]
    assert trace_documents(current, "contoso\\stuck.user")[0]["user"]["sam"] == "stuck.user"
    try:
        trace_documents(current, "nobody@contoso.com")
    except TraceNotFound:
        pass
    else:
        raise AssertionError("an unknown user was found")
    status, page = trace_page(current, "nobody@contoso.com")
    assert status == 404 and "No in-scope user matches" in page
    status, page = trace_page(current, "done.user")
    assert status == 200 and "completed the chain" in page


def test_pages_survive_absurd_times():
    current = snapshot()
    estate = current.estates[0]
    broken = dataclasses.replace(
        current,
        estates=(
            dataclasses.replace(
                estate,
                sources={k: dataclasses.replace(s, last_success=1e300) for k, s in estate.sources.items()},
            ),
        ),
    )
    assert "contoso" in landing_page(broken)
    assert isinstance(UserLabeler("upn").label("x", None, b"\0" * 16), str)

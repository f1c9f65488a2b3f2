"""The disk cache of pages and files: one build per data version, atomic files, pruning."""

from __future__ import annotations

import threading

import webref
from bioc_webstats import create_app, db
from bioc_webstats.config import load_settings
from bioc_webstats.webcache import DiskCache
from test_web_http import VT, bump


def test_get_or_build_builds_once_across_threads(tmp_path):
    cache = DiskCache(tmp_path / "cache", code_tag="t")
    calls = []
    start = threading.Barrier(8)
    results = []

    def build() -> tuple[bytes, bool]:
        calls.append(1)
        return b"x" * 100_000, True

    def worker():
        start.wait(10)
        results.append(cache.get_or_build(3, "bioc/bioc_pkg_stats.tab", build))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1
    assert {r.read_bytes() for r in results} == {b"x" * 100_000}
    assert not [p for p in (tmp_path / "cache" / "v3-t" / "bioc").iterdir() if ".tmp" in p.name]


def test_prune_keeps_newer_versions(tmp_path):
    cache = DiskCache(tmp_path / "cache", code_tag="t")
    for v in (1, 2, 5):
        cache.store(v, "a.txt", b"a")
    (tmp_path / "cache" / "unrelated").mkdir()
    cache.store(4, "a.txt", b"b")
    names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert names == ["unrelated", "v4-t", "v5-t"]


def test_unwritable_cache_still_answers(tmp_path):
    (tmp_path / "cache").write_text("a file where the directory should be")
    cache = DiskCache(tmp_path / "cache", code_tag="t")
    assert cache.get_or_build(1, "x.tab", lambda: (b"body", True)) == b"body"


def test_uncacheable_body_is_served_not_stored(tmp_path):
    cache = DiskCache(tmp_path / "cache", code_tag="t")
    assert cache.get_or_build(1, "x.tab", lambda: (b"moved on", False)) == b"moved on"
    assert cache.lookup(1, "x.tab") is None


def test_app_caches_under_state_dir_per_version(db_url, clean_env, monkeypatch):
    with db.session_factory(db_url)() as s:
        webref.load_direct(s, valid_thru=VT)
        version = db.get_data_version(s)
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    settings = load_settings()
    client = create_app(settings).test_client()
    body = client.get("/packages/stats/bioc/bioc_pkg_stats.tab").data
    cache = settings.state_dir / "cache"
    [vdir] = [p for p in cache.iterdir() if p.name.startswith(f"v{version}-")]
    assert (vdir / "bioc" / "bioc_pkg_stats.tab").read_bytes() == body
    bump(db_url)
    assert client.get("/packages/stats/bioc/bioc_pkg_stats.tab").data == body
    assert not vdir.exists()  # the old version was pruned
    assert [p.name for p in cache.iterdir() if p.name.startswith(f"v{version + 1}-")]


def test_build_racing_a_new_data_version_is_not_cached(db_url, clean_env, monkeypatch):
    """A body built after an ETL commit moved the data version on is not stored under the
    version the request was routed with."""
    from bioc_webstats.web import Target

    with db.session_factory(db_url)() as s:
        webref.load_direct(s, valid_thru=VT)
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    app = create_app(load_settings())
    site = app.extensions["webstats"]
    version, vt = site.meta()
    snap = site.snapshot(version, vt)
    target = Target("packages_txt", snap.categories["bioc"].category, "bioc/bioc_packages.txt")
    assert site.build(target, snap)[1] is True
    bump(db_url)  # the ETL commits between the request's meta read and its build
    body, cacheable = site.build(target, snap)
    assert cacheable is False and body.startswith(b"affy\n")

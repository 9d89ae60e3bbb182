"""``selftune search --out`` defaults to ``$SELFTUNE_STORAGE`` (the docker image sets it to the
volume every Ray node mounts), else ``runs``."""

from selftune.cli import build_parser


def test_out_defaults_to_selftune_storage(monkeypatch):
    monkeypatch.setenv("SELFTUNE_STORAGE", "/shared/ray_results")
    assert build_parser().parse_args(["search", "space.yaml"]).out == "/shared/ray_results"
    assert build_parser().parse_args(["search", "space.yaml", "--out", "elsewhere"]).out == "elsewhere"


def test_out_defaults_to_runs_without_it(monkeypatch):
    monkeypatch.delenv("SELFTUNE_STORAGE", raising=False)
    assert build_parser().parse_args(["search", "space.yaml"]).out == "runs"
    monkeypatch.setenv("SELFTUNE_STORAGE", "")
    assert build_parser().parse_args(["search", "space.yaml"]).out == "runs"

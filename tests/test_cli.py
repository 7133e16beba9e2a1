"""The command line's process-wide set-up."""

from __future__ import annotations

from fisher_jax.cli import use_compilation_cache


def test_compilation_cache_under_the_cache_root_and_switchable(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("FISHER_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("FISHER_JAX_COMPILATION_CACHE", "0")
    use_compilation_cache()
    import os

    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
    monkeypatch.delenv("FISHER_JAX_COMPILATION_CACHE")
    use_compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "jax_compilation_cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")  # the user's own setting wins
    use_compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == "/elsewhere"

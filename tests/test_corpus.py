"""Finding the firmware corpus (fota.testkit.corpus), and a test that needs it failing under CI=true
when it is missing instead of skipping (a skipped proof is not a passed one)."""
import os
import re
import subprocess
import sys
from pathlib import Path

from fota.testkit.corpus import ENV, corpus_dir, corpus_images

ROOT = Path(__file__).resolve().parent.parent


def _images(directory: Path, *names: str) -> None:
    directory.mkdir(parents=True)
    for name in names:
        (directory / name).write_bytes(name.encode())


def test_the_environment_variable_names_the_corpus(tmp_path, monkeypatch):
    _images(tmp_path / "elsewhere" / "esp8266", "v2.bin", "v1.bin", "notes.txt")
    monkeypatch.setenv(ENV, str(tmp_path / "elsewhere"))
    assert corpus_dir(tmp_path / "checkout") == tmp_path / "elsewhere"
    assert [p.name for p in corpus_images("esp8266", tmp_path / "checkout")] == ["v1.bin", "v2.bin"]
    monkeypatch.setenv(ENV, str(tmp_path / "nothing-here"))  # named but absent: missing, not replaced
    assert corpus_images("esp8266", tmp_path / "checkout") == []


def test_shared_corpus_beside_a_clone_or_above_a_worktree(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    _images(tmp_path / "ci" / "shared" / "corpus" / "esp8266", "a.bin", "b.bin")
    clone = tmp_path / "ci" / "fota"              # a fresh clone with shared/ copied beside it
    worktree = tmp_path / "ci" / "wt" / "branch"  # a worktree two levels further down
    for checkout in (clone, worktree):
        checkout.mkdir(parents=True)
        assert corpus_dir(checkout) == tmp_path / "ci" / "shared" / "corpus"
        assert len(corpus_images("esp8266", checkout)) == 2
    lonely = tmp_path / "lonely" / "fota"
    lonely.mkdir(parents=True)
    assert corpus_dir(lonely) is None and corpus_images("esp8266", lonely) == []


def _corpus_test(**env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("CI", ENV)}
    e.update(env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           "tests/test_delta.py", "-k", "corpus_round_trip"],
                          cwd=ROOT, env=e, capture_output=True, text=True, timeout=120)


def test_a_corpus_test_fails_under_ci_when_the_corpus_is_missing(tmp_path):
    missing = str(tmp_path / "no-corpus")
    ci = _corpus_test(CI="true", **{ENV: missing})
    # one corpus round trip per patch format: each fails, none passes
    assert ci.returncode == 1 and re.search(r"\b[1-9] failed", ci.stdout) and " passed" not in ci.stdout \
        and "required under CI=true" in ci.stdout, ci.stdout
    local = _corpus_test(**{ENV: missing})
    assert local.returncode == 0 and re.search(r"\b[1-9] skipped", local.stdout) and " passed" not in local.stdout \
        and "firmware corpus missing" in local.stdout, local.stdout

"""The Hub path offline: pinned revisions required, and a fast failure that names the fix."""

from __future__ import annotations

import pytest

from llm_packager.sources.hub import (
    HubUnreachableError,
    UnpinnedRevisionError,
    download_pinned_snapshot,
    is_commit,
    probe_hub,
)

PHI3 = "microsoft/Phi-3-mini-4k-instruct"
PHI3_COMMIT = "0a67737cc96d2554230f90338b163bc6380a2a85"


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    # An empty cache and a Hub address that refuses at once: offline on any machine.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def test_only_full_commits_count_as_pins():
    assert is_commit(PHI3_COMMIT)
    assert not is_commit("main")
    assert not is_commit(PHI3_COMMIT[:7])
    assert not is_commit(PHI3_COMMIT.upper())


def test_branch_is_refused_before_any_network_access():
    with pytest.raises(UnpinnedRevisionError, match="revision 'main' is not a 40-hex commit id"):
        download_pinned_snapshot(PHI3, "main", ["*.json"])


def test_unreachable_hub_fails_with_the_offline_fix():
    with pytest.raises(
        HubUnreachableError,
        match=r"^Cannot reach the Hugging Face Hub at http://127\.0\.0\.1:9 .*"
        r"-P model=tiny-random-phi3.*model\.source=local model\.local_dir=",
    ):
        download_pinned_snapshot(PHI3, PHI3_COMMIT, ["*.json"])


def test_hf_hub_offline_fails_without_trying_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        HubUnreachableError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE"
    ):
        download_pinned_snapshot(PHI3, PHI3_COMMIT, ["*.json"])


def test_probe_reports_unresolvable_hosts():
    with pytest.raises(HubUnreachableError, match=r"no-such-host\.invalid"):
        probe_hub("https://no-such-host.invalid", timeout=2)

"""The bundled cloud-model catalog, and merging it with providers' live model lists."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from pydantic import ValidationError

from control_plane.models.catalog import (
    BUNDLED_FILE,
    CatalogEntry,
    CatalogKey,
    diff_catalog,
    guess_entry,
    load_bundled_catalog,
    merge_catalog,
    parse_catalog,
)


def entry(provider: str, model_id: str, **fields: object) -> CatalogEntry:
    return CatalogEntry.model_validate(
        {
            "provider": provider,
            "model_id": model_id,
            "display_name": model_id.upper(),
            "endpoints": ["chat"],
            "input_price_per_mtok": 1.0,
            "output_price_per_mtok": 2.0,
            **fields,
        }
    )


def by_key(entries: list[CatalogEntry]) -> dict[CatalogKey, CatalogEntry]:
    return {e.key: e for e in entries}


class TestBundled:
    def test_loads_and_validates(self) -> None:
        catalog = load_bundled_catalog()
        assert 20 <= len(catalog) <= 40
        assert {"openai", "anthropic", "azure_openai"} <= {e.provider for e in catalog}
        assert len({e.key for e in catalog}) == len(catalog)
        for item in catalog:
            assert item.origin == "bundled"
            assert item.endpoints
            assert item.context_window is not None
            assert item.input_price_per_mtok is not None
            if item.endpoints == ["embedding"]:
                assert item.modality == "text"
                assert item.output_price_per_mtok is None
            else:
                assert item.output_price_per_mtok is not None
                assert item.output_price_per_mtok >= item.input_price_per_mtok

    def test_azure_mirrors_openai(self) -> None:
        catalog = by_key(load_bundled_catalog())
        azure = [key for key in catalog if key[0] == "azure_openai"]
        assert azure
        for _, model_id in azure:
            assert ("openai", model_id) in catalog

    def test_file_says_prices_are_indicative(self) -> None:
        text = resources.files("control_plane.models.catalog").joinpath(BUNDLED_FILE).read_text()
        data = json.loads(text)
        assert data["as_of"]
        assert "indicative" in data["note"].lower()
        assert "edit" in data["note"].lower()

    def test_rejects_duplicates_and_unknown_fields(self) -> None:
        one = {"provider": "openai", "model_id": "gpt-4o"}
        with pytest.raises(ValidationError, match="duplicate"):
            parse_catalog(json.dumps({"as_of": "x", "note": "y", "models": [one, one]}))
        with pytest.raises(ValidationError):
            parse_catalog(json.dumps({"as_of": "x", "note": "y", "models": [{**one, "price": 1}]}))
        with pytest.raises(ValidationError):
            parse_catalog(
                json.dumps(
                    {"as_of": "x", "note": "y", "models": [{**one, "input_price_per_mtok": -1}]}
                )
            )


class TestGuess:
    @pytest.mark.parametrize(
        ("model_id", "modality", "endpoints"),
        [
            ("text-embedding-3-small", "text", ["embedding"]),
            ("mistral-embed", "text", ["embedding"]),
            ("gpt-4o-2024-08-06", "text", ["chat"]),
            ("claude-future-5", "text", ["chat"]),
            ("whisper-1", "audio", ["transcription"]),
            ("gpt-4o-mini-tts", "audio", ["speech"]),
            ("dall-e-3", "image", ["image_generation"]),
            ("omni-moderation-latest", "text", ["moderation"]),
        ],
    )
    def test_guess_from_the_id(self, model_id: str, modality: str, endpoints: list[str]) -> None:
        guessed = guess_entry("openai", model_id)
        assert (guessed.modality, guessed.endpoints) == (modality, endpoints)
        assert guessed.origin == "live"
        assert guessed.display_name is None
        assert guessed.input_price_per_mtok is None
        assert guessed.output_price_per_mtok is None


BUNDLE = [
    entry("openai", "gpt-4o"),
    entry("openai", "gpt-old"),
    entry("anthropic", "claude-x"),
    entry("azure_openai", "gpt-4o"),
]


class TestMerge:
    def test_unchecked_providers_keep_their_bundle(self) -> None:
        merged = merge_catalog(BUNDLE, {})
        assert merged == BUNDLE
        assert all(e.origin == "bundled" for e in merged)

    def test_a_checked_provider_is_exactly_its_live_list(self) -> None:
        live = {"openai": ["gpt-4o", "text-embedding-9", "gpt-4o", "gpt-new"]}
        merged = by_key(merge_catalog(BUNDLE, live))
        # Bundled and live: the reviewed data, seen live.
        assert merged[("openai", "gpt-4o")] == BUNDLE[0].model_copy(update={"origin": "both"})
        # Bundled but no longer listed: gone from the merged catalog.
        assert ("openai", "gpt-old") not in merged
        # Live only: guessed, prices unknown.
        assert merged[("openai", "text-embedding-9")].endpoints == ["embedding"]
        assert merged[("openai", "gpt-new")].input_price_per_mtok is None
        assert merged[("openai", "gpt-new")].origin == "live"
        # Other providers untouched.
        assert merged[("anthropic", "claude-x")].origin == "bundled"
        assert merged[("azure_openai", "gpt-4o")].origin == "bundled"

    def test_order_bundle_first_then_live_only_sorted(self) -> None:
        live = {"openai": ["zeta", "gpt-4o", "alpha"], "anthropic": ["claude-y"]}
        merged = merge_catalog(BUNDLE, live)
        assert [e.key for e in merged] == [
            ("openai", "gpt-4o"),
            ("azure_openai", "gpt-4o"),
            ("anthropic", "claude-y"),
            ("openai", "alpha"),
            ("openai", "zeta"),
        ]

    def test_an_empty_live_list_empties_that_provider(self) -> None:
        merged = merge_catalog(BUNDLE, {"anthropic": []})
        assert ("anthropic", "claude-x") not in by_key(merged)


class TestDiff:
    def test_first_sync_adds_everything(self) -> None:
        merged = merge_catalog(BUNDLE, {})
        diff = diff_catalog({}, merged, providers_checked=set())
        assert diff.added == merged
        assert diff.updated == []
        assert diff.vanished == []

    def test_no_changes(self) -> None:
        merged = merge_catalog(BUNDLE, {"openai": ["gpt-4o", "gpt-old"]})
        diff = diff_catalog(by_key(merged), merged, providers_checked={"openai"})
        assert diff.added == diff.updated == diff.vanished == []

    def test_added_updated_vanished(self) -> None:
        current = by_key(merge_catalog(BUNDLE, {"openai": ["gpt-4o", "gpt-old"]}))
        bundle = [
            entry("openai", "gpt-4o", input_price_per_mtok=0.5),  # price cut
            *BUNDLE[1:],
        ]
        merged = merge_catalog(bundle, {"openai": ["gpt-4o", "gpt-new"]})
        diff = diff_catalog(current, merged, providers_checked={"openai"})
        assert [e.key for e in diff.added] == [("openai", "gpt-new")]
        assert [(e.key, e.input_price_per_mtok) for e in diff.updated] == [
            (("openai", "gpt-4o"), 0.5)
        ]
        assert [e.key for e in diff.vanished] == [("openai", "gpt-old")]

    def test_vanished_only_for_checked_providers(self) -> None:
        current = by_key(BUNDLE + [entry("anthropic", "claude-retired")])
        merged = merge_catalog(BUNDLE, {"openai": ["gpt-4o"]})
        diff = diff_catalog(current, merged, providers_checked={"openai"})
        # anthropic had no credentials: its rows stay, even one the bundle dropped.
        assert [e.key for e in diff.vanished] == [("openai", "gpt-old")]

    def test_a_live_only_entry_does_not_erase_what_we_know(self) -> None:
        # The bundle stopped listing gpt-old but the provider still serves it.
        current = by_key(BUNDLE)
        merged = merge_catalog([BUNDLE[0]], {"openai": ["gpt-4o", "gpt-old"]})
        diff = diff_catalog(current, merged, providers_checked={"openai"})
        updated = by_key(diff.updated)
        old = updated[("openai", "gpt-old")]
        assert old.input_price_per_mtok == 1.0
        assert old.display_name == "GPT-OLD"
        assert old.origin == "live"
        assert diff.added == []

    def test_an_unchecked_provider_keeps_what_the_last_check_saw(self) -> None:
        checked = merge_catalog(BUNDLE, {"anthropic": ["claude-x"]})
        current = by_key(checked)
        assert current[("anthropic", "claude-x")].origin == "both"
        merged = merge_catalog(BUNDLE, {})  # credentials removed since
        diff = diff_catalog(current, merged, providers_checked=set())
        assert diff.updated == []
        assert diff.vanished == []

"""The catalog of cloud models: a reviewed bundle shipped with the package
(`cloud_models.json`), merged with what each provider's live `/v1/models` lists.

Pure functions apart from reading the bundled file. Rules:

* `merge_catalog`: for a provider whose live list was fetched, the catalog is exactly
  that list: bundled entries it names keep their reviewed data (origin `both`), ids only
  the provider knows become entries with unknown prices and a modality guessed from the
  id (origin `live`), and bundled entries it does not name are left out. Providers
  without a live list (no credentials) keep their bundled entries (origin `bundled`).
* `diff_catalog`: what to write. A live-only entry never overwrites what the current
  row already knows (it only records that the provider serves it); `vanished` only
  lists rows of providers that were checked, so missing credentials never delete
  anything; an unchecked provider's rows keep the `both` origin the last check saw.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BUNDLED_FILE = "cloud_models.json"

Origin = Literal["bundled", "live", "both"]
CatalogKey = tuple[str, str]


class CatalogEntry(BaseModel):
    """One cloud model. Prices are USD per million tokens; None means unknown (or, for
    output of embedding models, not applicable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str = Field(min_length=1, max_length=32)
    model_id: str = Field(min_length=1, max_length=255)
    display_name: str | None = Field(default=None, max_length=255)
    # As in model metadata: `text`, `image-text` (image input), `audio`, `image`.
    modality: str = Field(default="text", min_length=1, max_length=32)
    endpoints: list[str] = Field(default_factory=list)
    context_window: int | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    input_price_per_mtok: float | None = Field(default=None, ge=0)
    output_price_per_mtok: float | None = Field(default=None, ge=0)
    # The provider has announced retirement; it still serves the model.
    deprecated: bool = False
    origin: Origin = "bundled"

    @property
    def key(self) -> CatalogKey:
        return (self.provider, self.model_id)


class BundledCatalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    as_of: str
    note: str
    models: list[CatalogEntry]

    @model_validator(mode="after")
    def _unique(self) -> BundledCatalog:
        seen: set[CatalogKey] = set()
        for entry in self.models:
            if entry.key in seen:
                raise ValueError(f"duplicate catalog entry {entry.provider}/{entry.model_id}")
            seen.add(entry.key)
        return self


class CatalogDiff(BaseModel):
    added: list[CatalogEntry] = Field(default_factory=list)
    updated: list[CatalogEntry] = Field(default_factory=list)
    # Current rows of checked providers that the provider no longer lists.
    vanished: list[CatalogEntry] = Field(default_factory=list)


def parse_catalog(text: str) -> BundledCatalog:
    return BundledCatalog.model_validate_json(text)


def load_bundled_catalog() -> list[CatalogEntry]:
    text = resources.files(__name__).joinpath(BUNDLED_FILE).read_text(encoding="utf-8")
    return parse_catalog(text).models


def guess_entry(provider: str, model_id: str) -> CatalogEntry:
    """An entry for an id only the provider's live list names: nothing known but what
    the id gives away. Anything that is not recognisably something else is chat."""
    lowered = model_id.lower()
    modality, endpoints = "text", ["chat"]
    if "embed" in lowered:
        endpoints = ["embedding"]
    elif "rerank" in lowered:
        endpoints = ["rerank"]
    elif "moderation" in lowered:
        endpoints = ["moderation"]
    elif "whisper" in lowered or "transcribe" in lowered:
        modality, endpoints = "audio", ["transcription"]
    elif "tts" in lowered:
        modality, endpoints = "audio", ["speech"]
    elif "dall-e" in lowered or "gpt-image" in lowered:
        modality, endpoints = "image", ["image_generation"]
    return CatalogEntry(
        provider=provider, model_id=model_id, modality=modality, endpoints=endpoints, origin="live"
    )


def merge_catalog(bundled: list[CatalogEntry], live: Mapping[str, list[str]]) -> list[CatalogEntry]:
    """The catalog as it should be: bundled order first, then live-only ids sorted by
    provider and id. `live` maps each provider whose list was fetched to its ids."""
    live_ids = {provider: set(ids) for provider, ids in live.items()}
    merged: list[CatalogEntry] = []
    bundled_keys: set[CatalogKey] = set()
    for entry in bundled:
        if entry.key in bundled_keys:
            continue
        bundled_keys.add(entry.key)
        served = live_ids.get(entry.provider)
        if served is None:
            merged.append(entry.model_copy(update={"origin": "bundled"}))
        elif entry.model_id in served:
            merged.append(entry.model_copy(update={"origin": "both"}))
    for provider in sorted(live_ids):
        for model_id in sorted(live_ids[provider]):
            if model_id and (provider, model_id) not in bundled_keys:
                merged.append(guess_entry(provider, model_id))
    return merged


def diff_catalog(
    current: Mapping[CatalogKey, CatalogEntry],
    merged: list[CatalogEntry],
    *,
    providers_checked: set[str],
) -> CatalogDiff:
    """What changes from `current` (the stored rows) to `merged`."""
    diff = CatalogDiff()
    merged_keys: set[CatalogKey] = set()
    for entry in merged:
        if entry.key in merged_keys:
            continue
        merged_keys.add(entry.key)
        existing = current.get(entry.key)
        if existing is None:
            diff.added.append(entry)
            continue
        target = entry
        if entry.origin == "live":
            target = existing.model_copy(update={"origin": "live"})
        elif (
            entry.provider not in providers_checked
            and entry.origin == "bundled"
            and existing.origin in ("live", "both")
        ):
            target = entry.model_copy(update={"origin": "both"})
        if target != existing:
            diff.updated.append(target)
    for key, existing in current.items():
        if key[0] in providers_checked and key not in merged_keys:
            diff.vanished.append(existing)
    return diff

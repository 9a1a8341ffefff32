"""Which license a model comes under, as an SPDX id, and what a tenant's policy says
about it. Pure functions, no I/O: the caller passes the card metadata, the small text
files of the repository and `config.json`.

Identifiers (`normalise_license`):

* SPDX ids with SPDX's own case: `apache-2.0`, `Apache License, Version 2.0` and
  `apache 2` all become `Apache-2.0`.
* Hugging Face's ids are deprecated-SPDX-like; the bare GNU ids mean "this version
  only" in SPDX, so `gpl-3.0` becomes `GPL-3.0-only` (`gpl-3.0+` / `...-or-later` keep
  the "or later"). A LICENSE file holding the GPL text cannot say "or later" either
  (that lives in source headers), so it reads as `-only` too: the narrower grant.
* Licenses without an SPDX id (model licenses: Llama, Gemma, the OpenRAIL family,
  research-only terms) become `other:<name>` with Hugging Face's lowercase name
  (`other:llama3`, `other:creativeml-openrail-m`). A bare `other` becomes
  `other:unspecified`; an unrecognised name becomes `other:<slug of it>`.
* Empty, `unknown`, `none`, `n/a` become `unknown`.

Detection (`detect_license`), first hit wins: the card's `license` (with
`license_name` when it is `other`), then the text of LICENSE/LICENCE/COPYING files
(recognised by distinctive phrases), then the README's YAML front matter, then
`config.json`'s `license`. A card that says `other` without a name still lets a
recognised LICENSE text name it.

Policy (`decide`): a deny match always wins; otherwise an exact entry beats a wildcard
(so `allow: [other:llama3]` overrides `require_approval: [other:*]`), and between
entries equally specific require_approval beats allow; then the default.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from fnmatch import fnmatchcase
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from workflows.contracts.models import LicenseDecision, LicenseInfo

UNKNOWN = "unknown"
OTHER_PREFIX = "other:"
OTHER_UNSPECIFIED = "other:unspecified"
EVIDENCE_MAX = 200

# SPDX ids we recognise, in SPDX's case. Reviewed by hand; extend as needed.
_SPDX_IDS = (
    "Apache-2.0",
    "MIT",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "BSD-3-Clause-Clear",
    "BSD-4-Clause",
    "ISC",
    "Zlib",
    "Unlicense",
    "WTFPL",
    "BSL-1.0",
    "PostgreSQL",
    "NCSA",
    "MS-PL",
    "AFL-3.0",
    "Artistic-2.0",
    "OSL-3.0",
    "ECL-2.0",
    "EPL-1.0",
    "EPL-2.0",
    "EUPL-1.1",
    "EUPL-1.2",
    "MPL-2.0",
    "GPL-2.0-only",
    "GPL-2.0-or-later",
    "GPL-3.0-only",
    "GPL-3.0-or-later",
    "LGPL-2.1-only",
    "LGPL-2.1-or-later",
    "LGPL-3.0-only",
    "LGPL-3.0-or-later",
    "AGPL-3.0-only",
    "AGPL-3.0-or-later",
    "LGPLLR",
    "GFDL-1.3-only",
    "CC0-1.0",
    "CC-BY-2.0",
    "CC-BY-2.5",
    "CC-BY-3.0",
    "CC-BY-4.0",
    "CC-BY-SA-3.0",
    "CC-BY-SA-4.0",
    "CC-BY-ND-4.0",
    "CC-BY-NC-2.0",
    "CC-BY-NC-3.0",
    "CC-BY-NC-4.0",
    "CC-BY-NC-ND-3.0",
    "CC-BY-NC-ND-4.0",
    "CC-BY-NC-SA-2.0",
    "CC-BY-NC-SA-3.0",
    "CC-BY-NC-SA-4.0",
    "CDLA-Permissive-1.0",
    "CDLA-Permissive-2.0",
    "CDLA-Sharing-1.0",
    "ODbL-1.0",
    "ODC-By-1.0",
    "PDDL-1.0",
    "OFL-1.1",
    "C-UDA-1.0",
    "etalab-2.0",
)

# Other spellings (Hugging Face ids, license titles, common shorthands) -> our id. Keys
# go through the same loosening as the input, so one spelling covers its variants.
_ALIASES: dict[str, str] = {
    # GNU: bare ids mean "only" (see the module docstring).
    "gpl-2": "GPL-2.0-only",
    "gpl-3": "GPL-3.0-only",
    "gpl-2+": "GPL-2.0-or-later",
    "gpl-3+": "GPL-3.0-or-later",
    "lgpl-2.1": "LGPL-2.1-only",
    "lgpl-3": "LGPL-3.0-only",
    "lgpl-2.1+": "LGPL-2.1-or-later",
    "lgpl-3+": "LGPL-3.0-or-later",
    "agpl-3": "AGPL-3.0-only",
    "agpl-3+": "AGPL-3.0-or-later",
    "lgpl-lr": "LGPLLR",
    "gfdl-1.3": "GFDL-1.3-only",
    # Titles and shorthands.
    "apache": "Apache-2.0",
    "asl-2": "Apache-2.0",
    "expat": "MIT",
    "new-bsd": "BSD-3-Clause",
    "modified-bsd": "BSD-3-Clause",
    "bsd-3": "BSD-3-Clause",
    "3-clause-bsd": "BSD-3-Clause",
    "simplified-bsd": "BSD-2-Clause",
    "freebsd": "BSD-2-Clause",
    "bsd-2": "BSD-2-Clause",
    "2-clause-bsd": "BSD-2-Clause",
    "mozilla-2": "MPL-2.0",
    "eclipse-2": "EPL-2.0",
    "boost-software-1": "BSL-1.0",
    "academic-free-3": "AFL-3.0",
    "cc0": "CC0-1.0",
    "cc-zero": "CC0-1.0",
    "odbl": "ODbL-1.0",
    "odc-by": "ODC-By-1.0",
    "pddl": "PDDL-1.0",
    "c-uda": "C-UDA-1.0",
    # Model licenses without SPDX ids.
    "llama-2": "other:llama2",
    "llama-3": "other:llama3",
    "llama-3.1": "other:llama3.1",
    "llama-3.2": "other:llama3.2",
    "llama-3.3": "other:llama3.3",
    "llama-4": "other:llama4",
    "gemma": "other:gemma",
    "openrail": "other:openrail",
    "openrail++": "other:openrail++",
    "creativeml-openrail-m": "other:creativeml-openrail-m",
    "bigscience-openrail-m": "other:bigscience-openrail-m",
    "bigcode-openrail-m": "other:bigcode-openrail-m",
    "bigscience-bloom-rail-1": "other:bigscience-bloom-rail-1.0",
    "deepfloyd-if": "other:deepfloyd-if-license",
    "fair-noncommercial-research": "other:fair-noncommercial-research-license",
    "apple-ascl": "other:apple-ascl",
    "apple-amlr": "other:apple-amlr",
    "intel-research": "other:intel-research",
    "h-research": "other:h-research",
    # Families named without a version: not one SPDX id.
    "bsd": "other:bsd",
    "cc": "other:cc",
    "gpl": "other:gpl",
    "lgpl": "other:lgpl",
    "gfdl": "other:gfdl",
}
_UNKNOWN_WORDS = {"", "unknown", "none", "n/a", "na", "null", "unlicensed", "no-license"}
_DROPPED_WORDS = {
    "the",
    "license",
    "licence",
    "licensed",
    "version",
    "international",
    "public",
    "community",
    "agreement",
    "terms",
    "of",
    "use",
}
_PHRASES = (
    ("lesser-general-public", "lgpl"),
    ("library-general-public", "lgpl"),
    ("affero-general-public", "agpl"),
    ("general-public", "gpl"),
    ("creative-commons", "cc"),
    ("attribution", "by"),
    ("noncommercial", "nc"),
    ("non-commercial", "nc"),
    ("sharealike", "sa"),
    ("share-alike", "sa"),
    ("noderivatives", "nd"),
    ("no-derivatives", "nd"),
    ("noderivs", "nd"),
    ("or-later", "+"),
    ("-only", ""),
)


def _loose(raw: str) -> str:
    """A lookup key: lowercase, one separator, long forms shortened (`General Public`
    -> `gpl`, `Attribution` -> `by`), filler words and `.0` versions dropped."""
    key = raw.strip().lower()
    key = re.sub(r"[\s_,;:()/\"']+", "-", key)
    key = re.sub(r"(?<=[a-z])(?=\d)", "-", key)  # gpl3, llama3.1, apache2
    key = re.sub(r"(^|-)v-?(?=\d)", r"\1", key)  # v3, version v2
    key = re.sub(r"(?<=[a-z])v-(?=\d)", "-", key)  # gplv3 (after the split above)
    for long, short in _PHRASES:
        key = key.replace(long, short)
    tokens: list[str] = []
    for token in key.split("-"):
        # Consecutive repeats too: "The MIT License (MIT)".
        if token and token not in _DROPPED_WORDS and (not tokens or tokens[-1] != token):
            tokens.append(token)
    key = "-".join(tokens).replace("-+", "+").removeprefix("gnu-")
    return re.sub(r"(\d)\.0(?=$|[-+])", r"\1", key)


def _build_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for spdx in _SPDX_IDS:
        # `-only` is what the bare GNU ids mean, so the loose key drops it; aliases map
        # the bare key back to `-only`.
        table.setdefault(_loose(spdx), spdx)
    for alias, target in _ALIASES.items():
        table[_loose(alias)] = target
    return table


_TABLE = _build_table()


def _slug(raw: str) -> str:
    slug = re.sub(r"\s+", "-", raw.strip().lower())
    slug = re.sub(r"[^a-z0-9.+_-]", "", slug)
    return re.sub(r"-+", "-", slug).strip("-")[:64]


def normalise_license(raw: str) -> str:
    """An SPDX id, `other:<name>`, or `unknown` (see the module docstring)."""
    text = raw.strip()
    lowered = text.lower()
    if lowered in _UNKNOWN_WORDS:
        return UNKNOWN
    if lowered == "other":
        return OTHER_UNSPECIFIED
    if lowered.startswith(OTHER_PREFIX):
        name = _slug(text[len(OTHER_PREFIX) :])
        known = _TABLE.get(_loose(name)) if name else None
        if known is not None and known.startswith(OTHER_PREFIX):
            return known
        return f"{OTHER_PREFIX}{name}" if name else OTHER_UNSPECIFIED
    for spdx in _SPDX_IDS:
        if spdx.lower() == lowered:
            return spdx
    known = _TABLE.get(_loose(text))
    if known is not None:
        return known
    slug = _slug(text)
    return f"{OTHER_PREFIX}{slug}" if slug else UNKNOWN


# --- detection -------------------------------------------------------------------------

_LICENSE_FILES = (
    "license",
    "license.md",
    "license.txt",
    "licence",
    "licence.md",
    "licence.txt",
    "copying",
    "copying.md",
    "copying.txt",
)


def _cc_id(match: re.Match[str], _text: str) -> str:
    parts = ["CC-BY"]
    if match.group("nc"):
        parts.append("NC")
    if match.group("sa"):
        parts.append("SA")
    elif match.group("nd"):
        parts.append("ND")
    parts.append(match.group("ver"))
    return "-".join(parts)


def _bsd_id(_match: re.Match[str], text: str) -> str:
    lowered = text.lower()
    if "all advertising materials mentioning" in lowered:
        return "BSD-4-Clause"
    if "neither the name" in lowered or "endorse or promote" in lowered:
        return "BSD-3-Clause"
    return "BSD-2-Clause"


def _llama_id(match: re.Match[str], _text: str) -> str:
    return f"other:llama{match.group('ver')}"


def _gnu_id(family: str) -> Callable[[re.Match[str], str], str]:
    def build(match: re.Match[str], _text: str) -> str:
        version = match.group("ver")
        return f"{family}-{version if '.' in version else version + '.0'}-only"

    return build


def _fixed(spdx: str) -> Callable[[re.Match[str], str], str]:
    return lambda _match, _text: spdx


# Distinctive phrases of license texts, matched on whitespace-collapsed text. When
# several match (a LICENSE with third-party notices appended), the earliest in the text
# names the license, since files open with their own.
_TEXT_RULES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str], str], str]], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), build)
    for pattern, build in (
        (r"llama (?P<ver>\d(?:\.\d)?) community license", _llama_id),
        (r"gemma terms of use", _fixed("other:gemma")),
        (r"creativeml open ?rail-m", _fixed("other:creativeml-openrail-m")),
        (r"bigcode open ?rail-m", _fixed("other:bigcode-openrail-m")),
        (r"bigscience rail license v1\.0", _fixed("other:bigscience-bloom-rail-1.0")),
        (r"bigscience open ?rail-m", _fixed("other:bigscience-openrail-m")),
        (r"\bopen ?rail(?:\+\+)?\b", _fixed("other:openrail")),
        (r"\bcc0 1\.0 universal", _fixed("CC0-1.0")),
        (
            r"creative commons attribution(?P<nc>[- ]noncommercial)?"
            r"(?:(?P<sa>[- ]sharealike)|(?P<nd>[- ]no ?deriv(?:ative)?s))? (?P<ver>\d\.\d)",
            _cc_id,
        ),
        (r"gnu affero general public license,? version (?P<ver>3)", _gnu_id("AGPL")),
        (r"gnu lesser general public license,? version (?P<ver>2\.1|3)", _gnu_id("LGPL")),
        (r"gnu library general public license,? version (?P<ver>2)", _gnu_id("LGPL")),
        (r"gnu general public license,? version (?P<ver>[23])", _gnu_id("GPL")),
        (r"mozilla public license,? (?:version|v\.?) ?2\.0", _fixed("MPL-2.0")),
        (r"apache license,? (?:version )?2\.0", _fixed("Apache-2.0")),
        (r"boost software license - version 1\.0", _fixed("BSL-1.0")),
        (
            r"permission to use, copy, modify, and(?:/or)? distribute this software for any "
            r"purpose with or without fee is hereby granted",
            _fixed("ISC"),
        ),
        (
            r"permission is hereby granted, free of charge, to any person obtaining a copy",
            _fixed("MIT"),
        ),
        (r"redistribution and use in source and binary forms", _bsd_id),
        (
            r"this is free and unencumbered software released into the public domain",
            _fixed("Unlicense"),
        ),
    )
)


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _evidence(text: str) -> str:
    return _collapse(text)[:EVIDENCE_MAX]


def recognise_license_text(text: str) -> tuple[str, str] | None:
    """(SPDX id, evidence) for a license text we recognise, else None."""
    collapsed = _collapse(text)
    best: tuple[int, str] | None = None
    for pattern, build in _TEXT_RULES:
        match = pattern.search(collapsed)
        if match is not None and (best is None or match.start() < best[0]):
            best = (match.start(), build(match, collapsed))
    if best is None:
        return None
    start, spdx = best
    # A few words before the phrase too ("META" before "LLAMA 3 COMMUNITY LICENSE").
    begin = max(0, start - 40)
    if begin > 0:
        space = collapsed.find(" ", begin, start)
        begin = space + 1 if space != -1 else start
    return spdx, collapsed[begin : begin + EVIDENCE_MAX]


def parse_front_matter(readme: str) -> dict[str, Any] | None:
    """The YAML mapping between the leading `---` lines of a model card, if any."""
    lines = readme.lstrip("\ufeff").lstrip().splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for end, line in enumerate(lines[1:], start=1):
        if line.strip() in {"---", "..."}:
            try:
                data = yaml.safe_load("\n".join(lines[1:end]))
            except yaml.YAMLError:
                return None
            return data if isinstance(data, dict) else None
    return None


def _from_metadata(meta: Mapping[str, Any], source: str) -> LicenseInfo | None:
    raw = meta.get("license")
    if isinstance(raw, list):
        raw = next((item for item in raw if isinstance(item, str) and item.strip()), None)
    if not isinstance(raw, str) or not raw.strip():
        return None
    evidence = f"license: {raw.strip()}"
    spdx = normalise_license(raw)
    if spdx == OTHER_UNSPECIFIED:
        name = meta.get("license_name")
        if isinstance(name, str) and name.strip():
            spdx = normalise_license(f"{OTHER_PREFIX}{name}")
            evidence += f", license_name: {name.strip()}"
        link = meta.get("license_link")
        if isinstance(link, str) and link.strip():
            evidence += f", license_link: {link.strip()}"
    if spdx == UNKNOWN:
        return None
    return LicenseInfo(spdx_id=spdx, source_file=source, evidence=evidence[:EVIDENCE_MAX])


def _find_file(files: Mapping[str, str], name: str) -> tuple[str, str] | None:
    for path, text in files.items():
        if path.lower() == name:
            return path, text
    return None


def detect_license(
    *,
    card: Mapping[str, Any] | None,
    files: Mapping[str, str],
    config: Mapping[str, Any] | None,
) -> LicenseInfo:
    """The model's license and where we read it (see the module docstring for order).

    `files` maps repository paths to the text of the small files we look at (LICENSE
    and friends, README.md). Returns `unknown` (with the head of an unrecognised
    LICENSE as evidence, when there is one) rather than guessing.
    """
    unspecified: LicenseInfo | None = None
    if card:
        found = _from_metadata(card, "README.md")
        if found is not None and found.spdx_id != OTHER_UNSPECIFIED:
            return found
        unspecified = found

    unrecognised: LicenseInfo | None = None
    for name in _LICENSE_FILES:
        hit = _find_file(files, name)
        if hit is None:
            continue
        path, text = hit
        recognised = recognise_license_text(text)
        if recognised is not None:
            spdx, evidence = recognised
            return LicenseInfo(spdx_id=spdx, source_file=path, evidence=evidence)
        if unrecognised is None and text.strip():
            unrecognised = LicenseInfo(spdx_id=UNKNOWN, source_file=path, evidence=_evidence(text))
    if unspecified is not None:
        return unspecified

    readme = _find_file(files, "readme.md")
    front = parse_front_matter(readme[1]) if readme else None
    if front is not None and readme is not None:
        found = _from_metadata(front, readme[0])
        if found is not None:
            return found

    if config:
        found = _from_metadata(config, "config.json")
        if found is not None:
            return found
    return unrecognised or LicenseInfo()


# --- policy ----------------------------------------------------------------------------

_WILDCARD = re.compile(r"[*?\[]")
_SETTABLE_DEFAULTS = (
    LicenseDecision.ALLOW,
    LicenseDecision.DENY,
    LicenseDecision.REQUIRE_APPROVAL,
)


def _normalise_entry(entry: str) -> str:
    entry = entry.strip()
    if _WILDCARD.search(entry):
        return entry  # matched case-insensitively; normalising would mangle the pattern
    if entry.lower() == "other":
        # In a policy a bare `other` reads as "any license without an SPDX id".
        return "other:*"
    return normalise_license(entry)


class LicensePolicy(BaseModel):
    """A tenant's license rules. Entries are license ids (normalised like detected
    ones) or fnmatch patterns (`other:*`, `CC-BY-NC-*`), compared case-insensitively."""

    model_config = ConfigDict(frozen=True)

    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)
    require_approval: list[str] = Field(default_factory=list)
    # Unknown and unlisted licenses wait for a human unless the tenant says otherwise.
    default: LicenseDecision = LicenseDecision.REQUIRE_APPROVAL

    @field_validator("allow", "deny", "require_approval")
    @classmethod
    def _normalise_entries(cls, entries: list[str]) -> list[str]:
        out: list[str] = []
        for entry in entries:
            normalised = _normalise_entry(entry)
            if normalised and normalised not in out:
                out.append(normalised)
        return out

    @field_validator("default")
    @classmethod
    def _settable_default(cls, value: LicenseDecision) -> LicenseDecision:
        # approved/rejected record a human's review of one model, not a rule.
        if value not in _SETTABLE_DEFAULTS:
            raise ValueError("default must be allow, deny or require_approval")
        return value


DEFAULT_POLICY = LicensePolicy(
    allow=[
        "Apache-2.0",
        "MIT",
        "BSD-2-Clause",
        "BSD-3-Clause",
        "BSD-3-Clause-Clear",
        "ISC",
        "Zlib",
        "Unlicense",
        "BSL-1.0",
        "PostgreSQL",
        "CC0-1.0",
        "CC-BY-2.0",
        "CC-BY-2.5",
        "CC-BY-3.0",
        "CC-BY-4.0",
        "CDLA-Permissive-1.0",
        "CDLA-Permissive-2.0",
    ],
    require_approval=[
        # Non-commercial, no-derivatives, share-alike and copyleft terms, and every
        # bespoke model license (use restrictions, user caps): a human reads them.
        "CC-BY-NC-*",
        "CC-BY-ND-*",
        "CC-BY-SA-*",
        "*GPL*",
        "MPL-*",
        "other:*",
        UNKNOWN,
    ],
    deny=[],
    default=LicenseDecision.REQUIRE_APPROVAL,
)


def _matches(pattern: str, spdx_id: str) -> bool:
    return fnmatchcase(spdx_id.lower(), pattern.lower())


def decide(policy: LicensePolicy, spdx_id: str) -> LicenseDecision:
    """What `policy` says about a license (see the module docstring for precedence)."""
    license_id = normalise_license(spdx_id)
    if any(_matches(p, license_id) for p in policy.deny):
        return LicenseDecision.DENY
    # Exact entries before patterns; among equally specific ones the cautious first.
    for want_pattern in (False, True):
        for entries, decision in (
            (policy.require_approval, LicenseDecision.REQUIRE_APPROVAL),
            (policy.allow, LicenseDecision.ALLOW),
        ):
            for entry in entries:
                is_pattern = _WILDCARD.search(entry) is not None
                if is_pattern == want_pattern and _matches(entry, license_id):
                    return decision
    return policy.default

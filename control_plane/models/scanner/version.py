"""Name and version stamped on every scan report."""

from __future__ import annotations

SCANNER_NAME = "cp-scan"
# Semantic version of what the scanner decides, not of its code. Bump the minor for any
# change to the allow/deny lists or to a rule that can change a verdict (a new check, a
# severity moved), the major when findings change meaning (codes renamed), the patch for
# fixes that cannot change any verdict. A new version makes `RescanModels` re-scan every
# stored model, so refactors that keep verdicts stable must not bump it.
SCANNER_VERSION = "1.0.0"

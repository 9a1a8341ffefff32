"""The embedded one-machine stack behind `cpctl dev` (and the test suite's servers)."""

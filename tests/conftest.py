pytest_plugins = [
    "tests.fixtures.infra",
    "tests.fixtures.stack",
    "tests.fixtures.s3",
    "tests.fixtures.identity",
    "tests.fixtures.oidc",
]

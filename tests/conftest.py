pytest_plugins = [
    "tests.fixtures.infra",
    "tests.fixtures.identity",
    "tests.fixtures.stack",
    "tests.fixtures.s3",
    "tests.fixtures.hf",
    "tests.fixtures.oidc",
    "tests.fixtures.kube",
]
